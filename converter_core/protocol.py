"""Megatron convert.py's queue protocol, exactly: a metadata namespace first, then named messages of
full (unsharded) tensors in Megatron layout, then "done"; the string "exit" means the loader failed.

Both directions use the same stream, so any of our loaders feeds any saver, ours or Megatron's.
"""

import types

from converter_core.errors import ConversionError, require

EMBEDDINGS = "embeddings"
FINAL_NORM = "final norm"
OUTPUT_LAYER = "output layer"
DONE = "done"
EXIT = "exit"


def layer_name(index):
    return f"transformer layer {index}"


def make_metadata(args, *, true_vocab_size, previous_tp=1, previous_pp=1, iteration=1,
                  consumed_train_samples=0, consumed_valid_samples=0):
    """The `md` namespace Megatron's savers read, derived from the model's Megatron args (one source of truth)."""
    return types.SimpleNamespace(
        model_type="GPT",
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        seq_length=args.seq_length,
        num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings,
        tokenizer_type=args.tokenizer_type,
        iteration=iteration,
        params_dtype=args.params_dtype,
        bert_binary_head=False,
        output_layer=args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        linear_bias=args.add_bias_linear,
        qkv_bias=args.add_qkv_bias,
        norm_has_bias=args.normalization == "LayerNorm",
        swiglu=args.swiglu,
        previous_tensor_parallel_size=previous_tp,
        previous_pipeline_parallel_size=previous_pp,
        true_vocab_size=true_vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        checkpoint_args=args,
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples,
        use_legacy_models=False,
        use_mcore_models=True,
        num_experts=None,
    )


def check_supported(md, where):
    """Our savers handle dense decoder-only GPT models with rotary positions; say so instead of writing junk."""
    require(md.model_type == "GPT", f"{where}: model type {md.model_type} is not supported (GPT only)")
    require(not getattr(md.checkpoint_args, "num_experts", None),
            f"{where}: mixture-of-experts checkpoints are not supported")
    require(md.position_embedding_type == "rope",
            f"{where}: position embedding {md.position_embedding_type!r} is not supported (rope only)")


def send(queue, name, message):
    """Megatron's queue_put: name the message, show progress, enqueue."""
    print(f"sending {name}", flush=True)
    message["name"] = name
    queue.put(message)


def send_model(queue, md, messages):
    """Send metadata, every (name, tensors) pair from `messages` in order, then "done"."""
    queue.put(md)
    for name, tensors in messages:
        send(queue, name, tensors)
    queue.put(DONE)


def expected_names(md):
    """The message names a saver must receive, in order, after the metadata."""
    names = [EMBEDDINGS] + [layer_name(i) for i in range(md.num_layers)] + [FINAL_NORM]
    if md.output_layer:
        names.append(OUTPUT_LAYER)
    return names


class Receiver:
    """The saver's end of the queue: Megatron's queue_get and check_message, raising instead of exit()."""

    def __init__(self, queue, checking=True):
        self.queue = queue
        self.checking = checking

    def _get(self):
        value = self.queue.get()
        if isinstance(value, str) and value == EXIT:
            raise ConversionError("loader exited, exiting saver")
        return value

    def metadata(self):
        md = self._get()
        require(isinstance(md, types.SimpleNamespace) or hasattr(md, "checkpoint_args"),
                f"expected the metadata namespace first, got {type(md).__name__}")
        return md

    def get(self, name):
        message = self._get()
        require(isinstance(message, dict), f'expected message "{name}", got {message!r}'[:200])
        if self.checking and message.get("name") != name:
            raise ConversionError(f'unexpected message: expecting "{name}" but got "{message.get("name")}"')
        print(f"received {name}", flush=True)
        return message

    def done(self):
        value = self._get()
        if not (isinstance(value, str) and value == DONE):
            name = value.get("name") if isinstance(value, dict) else type(value).__name__
            raise ConversionError(f'got more data ({name!r}) but was expecting "done"')

    def check_consumed(self, message):
        """Every key a saver did not pop is an error unless --no-checking (as Megatron's check_message)."""
        if not self.checking:
            return
        leftover = sorted(k for k in message if k != "name")
        require(not leftover, f"unexpected values in {message.get('name')}: {', '.join(leftover)} "
                              "(use --no-checking to ignore)")


def layer_message_shapes(args):
    """{message key: shape} of one dense "transformer layer N" message (reference §2.4)."""
    from converter_core import megatron_args
    hidden, heads = args.hidden_size, args.num_attention_heads
    groups, head_dim, ffn = megatron_args.query_groups(args), megatron_args.head_dim(args), megatron_args.ffn_size(args)
    qkv_rows = (heads + 2 * groups) * head_dim
    shapes = {"input norm weight": (hidden,), "post norm weight": (hidden,),
              "qkv weight": (qkv_rows, hidden), "dense weight": (hidden, heads * head_dim),
              "mlp l1 weight": (hidden, ffn)}
    if args.normalization == "LayerNorm":
        shapes.update({"input norm bias": (hidden,), "post norm bias": (hidden,)})
    if args.add_qkv_bias or args.add_bias_linear:
        shapes["qkv bias"] = (qkv_rows,)
    if args.add_bias_linear:
        shapes.update({"dense bias": (hidden,), "mlp l1 bias": (hidden,)})
    if args.swiglu:
        shapes.update({"mlp l0 weight W": (ffn, hidden), "mlp l0 weight V": (ffn, hidden)})
        if args.add_bias_linear:
            shapes.update({"mlp l0 bias W": (ffn,), "mlp l0 bias V": (ffn,)})
    else:
        shapes["mlp l0 weight"] = (ffn, hidden)
        if args.add_bias_linear:
            shapes["mlp l0 bias"] = (ffn,)
    return shapes
