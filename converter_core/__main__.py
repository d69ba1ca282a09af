from converter_core.cli import program

if __name__ == "__main__":
    program()
