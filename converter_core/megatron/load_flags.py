"""What both Megatron loaders (per-rank and torch_dist) share: their flags, and the stream metadata
they send, whose true vocabulary size comes from those flags."""

from converter_core import flags, protocol, vocab


def add_loader_arguments(parser, title, default_impl="transformer_engine"):
    group = parser.add_argument_group(title=title)
    group.add_argument("--true-vocab-size", type=flags.positive_int, default=None, help="vocabulary rows without padding")
    group.add_argument("--vocab-file", type=str, default=None, help="JSON vocabulary whose length is the true vocab size")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")
    group.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope"],
                       help="accepted for convert.py command lines; the checkpoint's args decide")
    group.add_argument("--loader-transformer-impl", default=default_impl, choices=["local", "transformer_engine"],
                       help="accepted; the name style is detected from the checkpoint")


def source_metadata(margs, args, iteration, tp, pp):
    """The stream metadata of a source whose Megatron args are `margs`; the true vocabulary size is
    --true-vocab-size's, else --vocab-file's length, else the args' vocab_size."""
    true_vocab = args.true_vocab_size or vocab.vocab_file_size(args.vocab_file) or margs.vocab_size
    return protocol.make_metadata(margs, true_vocab_size=true_vocab, previous_tp=tp, previous_pp=pp,
                                  iteration=iteration or 1,
                                  consumed_train_samples=getattr(margs, "consumed_train_samples", 0) or 0,
                                  consumed_valid_samples=getattr(margs, "consumed_valid_samples", 0) or 0)
