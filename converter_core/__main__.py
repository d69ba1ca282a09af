from converter_core.cli import main

main()
