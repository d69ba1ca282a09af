"""Megatron convert.py's queue protocol, exactly: a metadata namespace first, then named messages of
full (unsharded) tensors in Megatron layout, then "done"; the string "exit" means the loader failed.

Both directions use the same stream, so any of our loaders feeds any saver, ours or Megatron's.
"""

import argparse
import queue as queue_module
import types

import torch

from converter_core import layout, megatron_args
from converter_core.errors import ConversionError, Interrupted, require
from converter_core.formats import torch_file

EMBEDDINGS = "embeddings"
FINAL_NORM = "final norm"
OUTPUT_LAYER = "output layer"
DONE = "done"
EXIT = "exit"
EXIT_PUT_SECONDS = 10
LOADER_EXITED = "loader exited, exiting saver"  # what a saver says when it stops on the loader's "exit"
# The watchdog: how long a loader or saver waits on the other before calling the run stalled. Set by
# our orchestrator from --stall-timeout in each child; None (as under convert.py) waits forever.
stall_seconds = None


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
        qkv_bias=args.add_qkv_bias or args.add_bias_linear,
        norm_has_bias=args.normalization == "LayerNorm",
        swiglu=args.swiglu,
        previous_tensor_parallel_size=previous_tp,
        previous_pipeline_parallel_size=previous_pp,
        true_vocab_size=true_vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        checkpoint_args=args,
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples,
        use_legacy_models=bool(getattr(args, "use_legacy_models", False)),
        use_mcore_models=not getattr(args, "use_legacy_models", False),
    )


# Megatron features whose tensors or maths this converter does not carry: refused, never dropped.
_UNSUPPORTED = {"mtp_num_layers": "multi-token prediction layers",
                "heterogeneous_layers_config_path": "heterogeneous layers",
                "heterogeneous_layers_config_encoded_json": "heterogeneous layers"}
# Settings a Llama-layout HF config cannot say.
_NOT_IN_HF = {"apply_layernorm_1p": "apply_layernorm_1p (norm weights stored minus one)",
              "rotary_interleaved": "interleaved rotary embeddings",
              "rotary_seq_len_interpolation_factor": "rotary sequence-length interpolation"}


def check_supported(md, where, to_hf=False):
    """Our plugins handle dense decoder-only GPT models with rotary positions; anything else is refused
    in one line instead of being written as a different model."""
    require(md.model_type == "GPT", f"{where}: model type {md.model_type} is not supported (GPT only)")
    require(md.position_embedding_type == "rope",
            f"{where}: position embedding {md.position_embedding_type!r} is not supported (rope only)")
    args = md.checkpoint_args
    for name, what in _UNSUPPORTED.items():
        require(not getattr(args, name, None), f"{where}: {what} ({name}={getattr(args, name, None)!r}) is not supported")
    if to_hf:
        for name, what in _NOT_IN_HF.items():
            require(not getattr(args, name, None), f"{where}: {what} has no Hugging Face equivalent")


class exit_on_failure:
    """Megatron's loader contract: on any failure put "exit" on the queue, then re-raise, so a saver
    (ours or Megatron's, even under convert.py) stops instead of waiting forever."""

    def __init__(self, queue):
        self.queue = queue

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None or kind is Interrupted or kind is SystemExit and error.code in (None, 0):
            return False  # an interrupted run's saver is being stopped too
        try:  # a saver that died reads nothing; under our orchestrator the parent stops it at once anyway
            self.queue.put(EXIT, timeout=EXIT_PUT_SECONDS if _event_sink is None else 0)
        except queue_module.Full:
            pass
        return False


# Progress events. Our orchestrator gives each child a way to the parent (set_event_sink); without one
# (a plugin run by Megatron's convert.py) an event is printed as the line convert.py would show.
_event_sink = None


def set_event_sink(put):
    global _event_sink
    _event_sink = put


def report(event, **fields):
    """One progress event: start (messages, layers), sent / written (name, bytes), note, warning, saved."""
    fields["event"] = event
    if _event_sink is not None:
        _event_sink(fields)
    else:
        print(event_line(fields), flush=True)


def event_line(fields):
    """The line a person reads for an event, or None for events only a progress display shows."""
    event = fields["event"]
    if event in ("sent", "written"):
        return f"{'sending' if event == 'sent' else 'received'} {fields['name']}"
    if event == "warning":
        return f"warning: {fields['message']}"
    return fields.get("message")


def message_bytes(message):
    return sum(value.numel() * value.element_size() for value in message.values() if hasattr(value, "element_size"))


def _put(queue, value, what):
    try:
        queue.put(value, timeout=stall_seconds)
    except queue_module.Full:
        raise ConversionError(f"stalled: the saver took no message for {stall_seconds:g} s "
                              f"while {what} waited (--stall-timeout)") from None


def message_count(md):
    """Messages between the metadata and "done": embeddings, one per layer, final norm, output layer."""
    return md.num_layers + 2 + bool(md.output_layer)


def send(queue, name, message, count=None, total=None):
    """Megatron's queue_put: name the message, enqueue, report progress (count of total)."""
    size = message_bytes(message)
    message["name"] = name
    _put(queue, message, f'"{name}"')
    report("sent", name=name, bytes=size, count=count, total=total)


def send_model(queue, md, messages):
    """Send metadata, every (name, tensors) pair from `messages` in order, then "done"."""
    total = message_count(md)
    report("start", layers=md.num_layers, messages=total)
    _put(queue, md, "the metadata")
    for count, (name, tensors) in enumerate(messages, 1):
        send(queue, name, tensors, count, total)
    _put(queue, DONE, '"done"')


class Receiver:
    """The saver's end of the queue: Megatron's queue_get and check_message, raising instead of exit()."""

    def __init__(self, queue, checking=True, rows=False):
        """`rows`: the saver takes layout.Rows (row blocks) where a message holds a tensor; otherwise a
        tensor sent as Rows arrives concatenated."""
        if rows:
            layout.accept_rows()
        self.queue = queue
        self.checking = checking
        self.received_bytes = self.written = 0
        self.total = None

    def _get(self):
        try:
            value = self.queue.get(timeout=stall_seconds)
        except queue_module.Empty:
            raise ConversionError(f"stalled: no message from the loader for {stall_seconds:g} s "
                                  "(--stall-timeout)") from None
        if isinstance(value, str) and value == EXIT:
            raise ConversionError(LOADER_EXITED)  # its own report says why
        return value

    def metadata(self):
        """The metadata namespace, its checkpoint_args completed and made storable whichever loader
        (and Megatron-LM version) sent them."""
        md = self._get()
        require(isinstance(md, types.SimpleNamespace) or hasattr(md, "checkpoint_args"),
                f"expected the metadata namespace first, got {type(md).__name__}")
        require(isinstance(getattr(md, "checkpoint_args", None), argparse.Namespace),
                "the loader's metadata has no checkpoint_args Namespace")
        md.checkpoint_args = megatron_args.complete(torch_file.storable_namespace(md.checkpoint_args),
                                                    "metadata checkpoint_args")
        self.total = message_count(md)
        return md

    def get(self, name, shapes=None):
        """The next message, which must be `name`; with `shapes` ({key: shape}, None for any size) every
        key must be present with that shape."""
        message = self._get()
        if not isinstance(message, dict):
            raise ConversionError(f'expected message "{name}", got {type(message).__name__}')
        if self.checking and message.get("name") != name:
            raise ConversionError(f'unexpected message: expecting "{name}" but got "{message.get("name")}"')
        for key, shape in (shapes or {}).items():
            require(key in message, f'message "{name}" lacks {key!r}')
            got = tuple(getattr(message[key], "shape", ()))
            require(len(got) == len(shape) and all(w is None or w == g for w, g in zip(shape, got)),
                    f'message "{name}": {key!r} has shape {list(got)}, the model args imply {list(shape)}')
        self.received_bytes = message_bytes(message)
        return message

    def done(self):
        value = self._get()
        if not (isinstance(value, str) and value == DONE):
            name = value.get("name") if isinstance(value, dict) else type(value).__name__
            raise ConversionError(f'got more data ({name!r}) but was expecting "done"')

    def check_consumed(self, message):
        """Every key a saver did not pop is an error unless --no-checking (as Megatron's check_message);
        the saver calls it when done with a message, so it also reports the message written."""
        leftover = sorted(k for k in message if k != "name")
        require(not self.checking or not leftover, f"unexpected values in {message.get('name')}: "
                                                   f"{', '.join(leftover)} (use --no-checking to ignore)")
        self.written += 1
        report("written", name=message.get("name"), bytes=self.received_bytes, count=self.written, total=self.total)


# The keys of a "transformer layer N" message: full tensors in Megatron's layout (Megatron's own names;
# which ones a layer has follows from the model args, megatron_schema.layer_entries).
LAYER_KEYS = {
    "input norm weight": "norm before attention [hidden]", "input norm bias": "its bias (LayerNorm)",
    "qkv weight": "query, key, value rows grouped per KV head: per group, heads/groups query heads, then one key "
                  "head, then one value head [(heads + 2 groups) x head_dim, hidden]",
    "qkv bias": "the same rows' biases (add_qkv_bias)",
    "q norm weight": "per-head query norm (qk_layernorm) [head_dim]", "k norm weight": "per-head key norm [head_dim]",
    "q norm bias": "its bias (LayerNorm)", "k norm bias": "its bias (LayerNorm)",
    "dense weight": "attention output projection [hidden, heads x head_dim]", "dense bias": "its bias",
    "post norm weight": "norm before the MLP [hidden]", "post norm bias": "its bias (LayerNorm)",
    "mlp l0 weight W": "SwiGLU gate projection [ffn, hidden]", "mlp l0 weight V": "SwiGLU up projection [ffn, hidden]",
    "mlp l0 weight": "first MLP projection without SwiGLU [ffn, hidden]",
    "mlp l0 bias W": "gate bias", "mlp l0 bias V": "up bias", "mlp l0 bias": "first projection bias",
    "mlp l1 weight": "MLP output projection [hidden, ffn]", "mlp l1 bias": "its bias",
    "router weight": "MoE layers: the router [experts, hidden]; on these layers the mlp l0 weight W / V and "
                     "mlp l1 weight keys hold every expert stacked [experts, ...]",
    "shared mlp l0 weight W": "MoE layers: shared experts' gate [shared ffn, hidden]",
    "shared mlp l0 weight V": "shared experts' up [shared ffn, hidden]",
    "shared mlp l1 weight": "shared experts' output projection [hidden, shared ffn]",
    "router expert bias": "MoE layers with moe_router_enable_expert_bias: the routing score bias, float32 [experts]",
    "q down weight": "multi-latent attention (MLA): query down projection [q_lora_rank, hidden]",
    "q latent norm weight": "MLA: norm of the query latent [q_lora_rank]",
    "q up weight": "MLA: query up projection, per head qk_head_dim rows then qk_pos_emb_head_dim rope rows in "
                   "Megatron's interleaved rope order [heads x (qk_head_dim + qk_pos_emb_head_dim), q_lora_rank]",
    "q weight": "MLA without q_lora_rank: the query projection, rows as q up weight's [..., hidden]",
    "kv down weight": "MLA: key/value latent projection, kv_lora_rank rows then the shared rope key's "
                      "qk_pos_emb_head_dim rows (interleaved rope order) [kv_lora_rank + qk_pos_emb_head_dim, hidden]",
    "kv latent norm weight": "MLA: norm of the key/value latent [kv_lora_rank]",
    "kv up weight": "MLA: key/value up projection, per head qk_head_dim key rows then v_head_dim value rows "
                    "[heads x (qk_head_dim + v_head_dim), kv_lora_rank]; MLA's dense weight is [hidden, heads x v_head_dim]",
}


# Message tensors that stay float32 whatever the model's dtype (Megatron-Core and DeepSeek-V3 keep the
# routing bias in float32: a bf16 bias would change which experts are chosen).
FLOAT32_KEYS = ("router expert bias",)


def stored_dtype(key, dtype):
    """The dtype message tensor `key` is written in, for a model of `dtype`."""
    return torch.float32 if key in FLOAT32_KEYS else dtype


def layer_message_shapes(args, index=0):
    """{message key: shape} of the "transformer layer `index`" message (reference §2.4); which keys a
    layer has is megatron_schema.layer_entries' decision, made in that one place."""
    from converter_core import megatron_schema
    hidden, heads = args.hidden_size, args.num_attention_heads
    groups, head_dim, ffn = megatron_args.query_groups(args), megatron_args.head_dim(args), megatron_args.ffn_size(args)
    qkv_rows = (heads + 2 * groups) * head_dim
    every_shape = {
        "input norm weight": (hidden,), "input norm bias": (hidden,), "post norm weight": (hidden,),
        "post norm bias": (hidden,), "qkv weight": (qkv_rows, hidden), "qkv bias": (qkv_rows,),
        "q norm weight": (head_dim,), "k norm weight": (head_dim,), "q norm bias": (head_dim,), "k norm bias": (head_dim,),
        "dense weight": (hidden, heads * head_dim), "dense bias": (hidden,),
        "mlp l0 weight W": (ffn, hidden), "mlp l0 weight V": (ffn, hidden), "mlp l0 weight": (ffn, hidden),
        "mlp l0 bias W": (ffn,), "mlp l0 bias V": (ffn,), "mlp l0 bias": (ffn,),
        "mlp l1 weight": (hidden, ffn), "mlp l1 bias": (hidden,)}
    if getattr(args, "multi_latent_attention", False):
        q_rows = heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)
        every_shape.update({
            "q down weight": (args.q_lora_rank, hidden), "q latent norm weight": (args.q_lora_rank,),
            "q up weight": (q_rows, args.q_lora_rank), "q weight": (q_rows, hidden),
            "kv down weight": (args.kv_lora_rank + args.qk_pos_emb_head_dim, hidden),
            "kv latent norm weight": (args.kv_lora_rank,),
            "kv up weight": (heads * (args.qk_head_dim + args.v_head_dim), args.kv_lora_rank),
            "dense weight": (hidden, heads * args.v_head_dim)})
    if megatron_args.moe_layers(args)[index]:
        experts, expert_ffn = args.num_experts, megatron_args.expert_ffn_size(args)
        shared = getattr(args, "moe_shared_expert_intermediate_size", None)
        every_shape.update({
            "router weight": (experts, hidden), "router expert bias": (experts,), "mlp l0 weight W": (experts, expert_ffn, hidden),
            "mlp l0 weight V": (experts, expert_ffn, hidden), "mlp l1 weight": (experts, hidden, expert_ffn),
            "shared mlp l0 weight W": (shared, hidden), "shared mlp l0 weight V": (shared, hidden),
            "shared mlp l1 weight": (hidden, shared)})
    return {key: every_shape[key] for entry in megatron_schema.layer_entries(args, index) for key in entry.keys}
