"""A Hugging Face family: its architectures, layer table and features; which family a config.json or a
stream is; and the layer tensors mapped both ways by the table's kinds."""

import dataclasses
import fnmatch
import functools
import importlib
import importlib.metadata
import json
import re
import warnings

import torch

from converter_core import protocol
from converter_core.errors import ConversionError, require
from converter_core.hf_family.features import LLAMA_BIAS_SWITCHES, Activation, Norm
from converter_core.hf_family.mla import Mla
from converter_core.hf_family.table import LLAMA_LAYER
from converter_core.megatron import args as megatron_args


@dataclasses.dataclass(frozen=True)
class Family:
    """An HF model family. `layer`: its table of Tensor rows; `norm` / `activation`: its Norm and
    Activation; `features`: further parts (Refused switches, a plugin's own Feature objects); `experts`:
    an Experts for MoE families; `mla`: an Mla for multi-latent attention families (`mla=True` with
    `rope_interleaved` is its deprecated spelling, mapped to Mla(rope_interleaved)); `args`: Megatron
    args every model of the family has (add_qkv_bias, qk_layernorm); `config`: config.json fields
    written when absent; `fields`: {config key: Megatron arg} carried both ways when present;
    `tied_by_default`: what a config without tie_word_embeddings means;
    `ignored`: patterns (fnmatch) of HF tensors the loader skips, such as a stored rope cache; `notes`:
    lines for the supported-models report; `mtp`: an Mtp when the family stores multi-token-prediction
    layers (after the decoder layers, under the same prefix); `config_key`: the key of the object inside
    config.json that holds the decoder's fields (a multimodal or wrapper config's "text_config", with
    architectures and model_type outside it), None when they are at the top; `outer`: that outer object's
    fields for a model without a stored config.json (`config` then fills the decoder object).
    The top-level tensor names and the layer prefix default to Llama's."""
    model_type: str
    architectures: tuple
    layer: tuple = LLAMA_LAYER
    args: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    fields: dict = dataclasses.field(default_factory=dict)
    tied_by_default: bool = False
    experts: object = None
    mtp: object = None
    mla: Mla = None
    rope_interleaved: object = True  # deprecated: Mla(rope_interleaved=...)
    norm: Norm = Norm()
    activation: Activation = Activation()
    features: tuple = LLAMA_BIAS_SWITCHES
    notes: tuple = ()
    ignored: tuple = ("*rotary_emb.inv_freq",)
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    output_layer: str = "lm_head.weight"
    layers: str = "model.layers.{}."
    config_key: str = None
    outer: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """The first SDK's booleans (`mla=True`, `rope_interleaved`) become the Mla feature, with a warning."""
        if self.mla is True or self.rope_interleaved is not True:
            require(not isinstance(self.mla, Mla), f"{self.model_type}: write rope_interleaved inside "
                                                   "mla=plugin.Mla(rope_interleaved=...), not beside it")
            warnings.warn(f"{self.model_type}: Family(mla=True, rope_interleaved=...) is deprecated; write "
                          f"Family(mla=plugin.Mla(rope_interleaved={self.rope_interleaved!r}))", DeprecationWarning,
                          stacklevel=4)  # the table's line: past this, the dataclass's __init__ and _with_switches
            object.__setattr__(self, "mla", Mla(self.rope_interleaved) if self.mla else None)
            object.__setattr__(self, "rope_interleaved", True)
        elif self.mla is False:  # the first SDK's default
            object.__setattr__(self, "mla", None)
        require(self.mla is None or isinstance(self.mla, Mla),
                f"{self.model_type}: mla must be a plugin.Mla(rope_interleaved=...), got {self.mla!r:.40}")

    @property
    def parts(self):
        """Every feature: norm, activation, the others, then experts, multi-token prediction and MLA."""
        return (self.norm, self.activation, *self.features) + tuple(part for part in (self.experts, self.mtp, self.mla)
                                                                    if part)

    @property
    def settings(self):
        """The Megatron args every model of the family has set (what a format must be able to hold)."""
        settings = dict(self.args, num_experts=False, multi_latent_attention=False)
        for part in self.parts:
            settings.update(part.settings())
        return settings

    @property
    def architecture(self):
        return self.architectures[0]

    @property
    def final_norm_bias(self):
        """The final norm's bias name (LayerNorm families): the weight's name ending in bias."""
        return self.final_norm.removesuffix("weight") + "bias"

    def final_norm_names(self):
        """{message key: HF name} of the final norm."""
        return {"weight": self.final_norm, **({"bias": self.final_norm_bias} if self.norm.bias else {})}

    def ignores(self, name):
        """Whether the loader skips HF tensor `name` (it carries nothing Megatron has)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignored)

    def layer_prefix(self, index):
        return self.layers.format(index)

    def layer_index(self, name):
        """The layer number of an HF tensor name, or None for a tensor outside the layers."""
        before, _, after = self.layers.partition("{}")
        match = re.match(re.escape(before) + "([0-9]+)" + re.escape(after), name)
        return int(match.group(1)) if match else None

    def active(self, args, index=0):
        """The layer table rows present in layer `index` of a model with Megatron args `args`."""
        moe = megatron_args.is_moe_layer(args, index)
        return [row for row in self.layer if row.present(args, moe, index)]

    def layer_rows(self, args, index):
        """The rows of layer `index`: a decoder layer's, or for num_layers + i, multi-token-prediction
        layer i's parts (Mtp.layer) and its transformer layer (built like the last decoder layer)."""
        parts = self.mtp.layer if index >= args.num_layers and self.mtp else ()
        return list(parts) + self.active(args, index)

    def mla_rope_interleaved(self, args):
        """Whether the MLA rope rows of the model with Megatron args `args` are interleaved pairs as
        Megatron-Core's are (Mla.interleaved, read from the stream's stored config.json)."""
        return self.mla is None or self.mla.interleaved(self.decoder_config(stored_config(args) or {}))

    def decoder_config(self, config, where="config.json"):
        """The object of a config.json of this family that holds the decoder's fields (see config_key)."""
        if not self.config_key:
            return config
        decoder = config.get(self.config_key) if config else {}
        require(isinstance(decoder, dict), f"{where}: {self.config_key} must be an object holding the decoder's "
                                           f"fields, got {decoder!r:.40}")
        return decoder


# Boolean switches of the first SDK that plugins now spell as features: {name: (features, what to write)}.
# A plugin registers its own at import (deprecate_switch), so the core names none of them.
_SWITCHES = {}


def deprecate_switch(name, features, instead):
    """Keep the first SDK's `Family(name=True)` working: it adds `features` (Feature objects) to the
    family's, with one DeprecationWarning at the table's line saying `instead`, what to write now;
    `name=False` (that SDK's default) adds nothing."""
    _SWITCHES[name] = (tuple(features), instead)


def _switch(name):
    """The registered switch `name`, or None. Plugins register theirs when imported, and a table may be
    built before any has been (a third-party loader is imported first), so converter_core's own installed
    plugin modules are imported once before a name counts as unknown."""
    if name not in _SWITCHES:
        for group in ("converter_core.loaders", "converter_core.savers"):
            for entry in importlib.metadata.entry_points(group=group):
                if entry.dist and entry.dist.name == "converter_core":
                    importlib.import_module(entry.module)
    return _SWITCHES.get(name)


def _with_switches(init):
    @functools.wraps(init)
    def __init__(self, *positional, **named):
        for name in [name for name in named if name not in Family.__dataclass_fields__ and _switch(name)]:
            features, instead = _SWITCHES[name]
            if named.pop(name):
                model_type = named.get("model_type", positional[0] if positional else "?")
                warnings.warn(f"{model_type}: Family({name}=True) is deprecated; write {instead}", DeprecationWarning,
                              stacklevel=2)
                named["features"] = tuple(named.get("features", LLAMA_BIAS_SWITCHES)) + features
        init(self, *positional, **named)
    return __init__


Family.__init__ = _with_switches(Family.__init__)  # an unregistered name is refused as any unknown field


def by_model_type(*members):
    """{model_type: Family}: the form a plugin declares its FAMILIES in."""
    return {family.model_type: family for family in members}


def stored_config(args):
    """The config.json the stream was made from, if it came from Hugging Face."""
    text = getattr(args, "hf_config_json", None)
    return json.loads(text) if text else None


def family_of(config, where, families):
    """The family of a config.json: by model_type, else (some hub configs have none) by architecture."""
    model_type = config.get("model_type")
    if model_type is None:
        by_architecture = {a: f for f in families.values() for a in f.architectures}
        model_type = next((by_architecture[a].model_type for a in config.get("architectures") or []
                           if a in by_architecture), None)
    require(model_type in families,
            f"{where}: model_type {model_type!r} is not one of {', '.join(sorted(families))}")
    return families[model_type]


def family_for_stream(args, families, where):
    """The family a saver writes: the one the stream came from (its stored config.json) when it is
    among `families`, else the first whose table holds exactly the stream's layer tensors and whose
    implied args the stream has, preferring one whose features the stream carries (scaling rules a
    Megatron-made stream has in its args) and that has no such feature the stream lacks."""
    stored = stored_config(args) or {}
    try:
        return family_of(stored, where, families)
    except ConversionError:
        pass
    fitting = [family for family in families.values()
               if all(getattr(args, name, None) == value for name, value in family.args.items())
               and not mismatch(family, args)]

    def agreement(family):
        marks = [part.carried_by(args) for part in family.parts]
        return sum(mark is True for mark in marks) - sum(mark is False for mark in marks)
    if fitting:
        return max(fitting, key=agreement)  # max keeps the first of equals
    first = next(iter(families.values()))
    reason = mismatch(first, args) or ", ".join(f"{k}={v!r}" for k, v in first.args.items()) + " is not set"
    raise ConversionError(f"{where}: none of {', '.join(families)} can hold the stream ({first.model_type}: {reason})")


def mismatch(family, args):
    """Why `family` cannot hold a model with Megatron args `args` (message keys no row of its layer
    table fills, rows filling keys the model lacks, settings its features do not have), or None."""
    parts = []
    if getattr(args, "rotary_percent", 1.0) != 1.0 and "rotary_percent" not in family.fields.values():
        parts.append(f"rotary_percent {args.rotary_percent} has no Hugging Face "
                     f"{family.architecture.removesuffix('ForCausalLM')} equivalent")
    for part in (family.norm, family.activation, *family.features):
        parts += part.problems(args, family)
    kinds = megatron_args.moe_layers(args)
    linear = megatron_args.linear_attention_layers(args)
    layer_kinds = list(zip(kinds, linear))
    for index in sorted({layer_kinds.index(kind) for kind in layer_kinds}):  # the first layer of each kind
        wanted = set(protocol.layer_message_shapes(args, index))
        filled = {key for row in family.active(args, index) for key in row.keys}
        layer = (f"{'MoE' if kinds[index] else 'dense'} " if any(kinds) else "") + \
            (f"{'linear' if linear[index] else 'softmax'}-attention " if any(linear) else "")
        layer = f"{layer}layers: " if layer else ""
        if wanted - filled:
            parts.append(f"{layer}the model's {', '.join(sorted(wanted - filled))} has no tensor in {family.model_type}")
        if filled - wanted:
            parts.append(f"{layer}{family.model_type}'s {', '.join(sorted(filled - wanted))} has no place in the model")
    if any(kinds) and family.experts is None:
        parts.append(f"{family.model_type} has no mixture-of-experts settings")
    elif any(kinds):
        parts += family.experts.problems(args, family)
    if megatron_args.mtp_layers(args) and family.mtp is None:
        parts.append(f"{family.model_type} has no multi-token-prediction layers (the model has "
                     f"mtp_num_layers={args.mtp_num_layers})")
    elif megatron_args.mtp_layers(args):
        wanted = set(protocol.layer_message_shapes(args, args.num_layers))
        filled = {key for row in family.layer_rows(args, args.num_layers) for key in row.keys}
        if wanted != filled:
            parts.append(f"multi-token-prediction layers: {family.model_type} fills "
                         f"{', '.join(sorted(filled - wanted)) or 'nothing more'} and lacks "
                         f"{', '.join(sorted(wanted - filled)) or 'nothing'}")
    return "; ".join(parts) or None


def check_table(family, args, where):
    problem = mismatch(family, args)
    require(problem is None, f"{where}: {problem}")


def expected_shapes(args, vocab_rows, family):
    """{hf name: shape} of every tensor of the model, in file order."""
    shapes = {family.embedding: (vocab_rows, args.hidden_size)}
    for i in range(all_layers(args)):
        message = protocol.layer_message_shapes(args, i)
        prefix = family.layer_prefix(i)
        shapes.update((prefix + name, shape) for row in family.layer_rows(args, i)
                      for name, shape in row.kind.hf_shapes(row, message, args))
    shapes.update((name, (args.hidden_size,)) for name in family.final_norm_names().values())
    if megatron_args.untied(args):
        shapes[family.output_layer] = (vocab_rows, args.hidden_size)
    if family.mtp:
        shapes.update((name, (vocab_rows, args.hidden_size)) for name in family.mtp.copies(args, family))
    return shapes


def all_layers(args):
    """Decoder layers, then multi-token-prediction layers (index num_layers + i)."""
    return args.num_layers + megatron_args.mtp_layers(args)


def float32_names(args, family):
    """HF names of the tensors kept in float32 whatever the model's dtype (protocol.stored_dtype)."""
    return {family.layer_prefix(i) + name for i in range(all_layers(args)) for row in family.layer_rows(args, i)
            if all(protocol.stored_dtype(key, None) is torch.float32 for key in row.keys) for name in row.hf_names}


def layer_to_message(tensors, index, args, family):
    """HF tensors of layer `index` (a dict by full HF name) -> the Megatron message."""
    prefix, message = family.layer_prefix(index), {}
    inside = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    for row in family.layer_rows(args, index):
        message.update(row.kind.to_megatron(row, inside, args, family))
    return message


def message_to_layer(message, index, args, family):
    """The inverse of layer_to_message; pops what it uses so the receiver can check for leftovers. A
    tensor split out of QKV comes as a tuple of row blocks (layout.megatron_qkv_to_hf), not yet copied."""
    prefix, tensors = family.layer_prefix(index), {}
    for row in family.layer_rows(args, index):
        tensors.update((prefix + name, tensor) for name, tensor in row.kind.to_hf(row, message, args, family).items())
    return tensors
