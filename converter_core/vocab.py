"""The true vocabulary size of a Megatron checkpoint, whose tables are padded for TP."""

from pathlib import Path

from converter_core import layout, protocol
from converter_core.errors import ConversionError, require
from converter_core.formats import hf
from converter_core.formats.untrusted import regular_file


def tokenizer_size(path):
    """Token count of a tokenizer folder or file, added tokens included."""
    path = Path(path)
    require(path.exists(), f"{path}: no such tokenizer folder or file")
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / "tokenizer.json").is_file() or path.name == "tokenizer.json":
        from tokenizers import Tokenizer
        file = path / "tokenizer.json" if path.is_dir() else path
        regular_file(file)
        try:
            return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
        except Exception as error:
            raise ConversionError(f"{file}: unreadable tokenizer ({error})") from None
    model = path / "tokenizer.model" if path.is_dir() else path
    require(model.exists(), f"{path}: no tokenizer.json or tokenizer.model")
    regular_file(model)
    import sentencepiece
    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    except Exception as error:
        raise ConversionError(f"{model}: unreadable SentencePiece model ({error})") from None
    added_file = folder / "added_tokens.json"
    added = hf.read_json(added_file) if added_file.exists() else {}
    require(isinstance(added, dict), f"{added_file}: expected a JSON object of token ids")
    for token, index in added.items():  # added tokens follow the pieces: an id beyond them is not a vocabulary
        require(isinstance(index, int) and not isinstance(index, bool) and 0 <= index < pieces + len(added),
                f"{added_file}: {token!r:.40} has id {index!r:.40}, not one of 0..{pieces + len(added) - 1}")
    return max([pieces - 1, *added.values()]) + 1


def vocab_file_size(path):
    """convert.py's --vocab-file: the length of a JSON vocabulary."""
    if not path:
        return None
    vocabulary = hf.read_json(path)
    require(isinstance(vocabulary, (dict, list)), f"{path}: expected a JSON object or list of tokens")
    return len(vocabulary)


def true_vocab_size(args, md, margs):
    """--true-vocab-size, else the tokenizer given, else the loader's metadata or the checkpoint's
    args.vocab_size; else keep the padded rows and say so."""
    if getattr(args, "true_vocab_size", None):
        return args.true_vocab_size
    if getattr(args, "tokenizer_model", None):
        return tokenizer_size(args.tokenizer_model)
    for value in (getattr(md, "true_vocab_size", None), getattr(margs, "vocab_size", None)):
        if value:
            return value
    padded = margs.padded_vocab_size
    protocol.report("warning", message=f"true vocabulary size unknown; keeping all {padded} padded rows "
                                       "(give --true-vocab-size or --tokenizer-model to trim them)")
    return padded


def trim(table, rows, what):
    require(table.shape[0] >= rows, f"{what} has {table.shape[0]} rows, fewer than the vocabulary size {rows}")
    return layout.Rows(layout.row_blocks(table, 0, rows)) if isinstance(table, layout.Rows) else table[:rows]
