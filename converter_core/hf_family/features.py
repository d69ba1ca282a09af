"""Family features: composable parts that each map config.json <-> Megatron args (and say what a
model has that the family cannot hold) in one place. A family is its table plus a few of these; a
plugin adds its own by subclassing Feature (e.g. a family's own scaling rules or rope variant)."""

import dataclasses

from converter_core.errors import require


class Feature:
    """A part of a family. Every hook has a do-nothing default, so a feature implements only its own."""

    def to_args(self, config, where, family):
        """Megatron args from config.json (raise ConversionError naming `where` for a setting it cannot map)."""
        return {}

    def to_config(self, config, args, family):
        """Write the args' settings into config.json in the family's spelling (in place)."""

    def problems(self, args, family):
        """Why a model with Megatron args `args` cannot be written as `family`: a list of short reasons."""
        return []

    def settings(self):
        """Megatron args every model of a family with this feature has (what a format must be able to hold)."""
        return {}

    def carried_by(self, args):
        """For a feature whose settings mark a stream (scaling rules, say): whether `args` carry them.
        None for features every model has in some form."""
        return None

    def rope_args(self, kind, scaling, config, where, family):
        """Megatron args for an HF rope scaling of type `kind` this feature owns, else None."""
        return None

    def rope_scaling(self, args, family):
        """The HF rope scaling dict for args whose rope this feature owns, else None."""
        return None

    def fold(self, args, family, where):
        """A Fold writing a stream that carries this feature's settings as `family`, which lacks the
        feature; None if it cannot be folded away (the stream is then refused)."""
        return None


@dataclasses.dataclass
class Fold:
    """A stream written as a family without one of its features: the args and family to write with,
    factors on the tensors (the output layer is always written, from the embeddings if the stream is
    tied), and the note said after saving."""
    args: object
    family: object
    embeddings: float = 1.0
    layer: dict = dataclasses.field(default_factory=dict)  # {message key: factor}
    output: float = 1.0
    note: str = ""


def first_key(config, keys):
    """The first of `keys` config.json has, else the first (the family's own spelling)."""
    return next((key for key in keys if key in config), keys[0])


@dataclasses.dataclass(frozen=True)
class Norm(Feature):
    """The norms: RMSNorm or LayerNorm (with biases, the final norm's too); `epsilon`: config keys of the
    epsilon (the first present is read; a config without one is written with the first); `zero_centred`:
    the stored weights are the scale minus one (x * (1 + w), as some families store them), which is
    Megatron's layernorm_zero_centered_gamma (the --apply-layernorm-1p flag): the weights copy unchanged."""
    kind: str = "RMSNorm"
    epsilon: tuple = ("rms_norm_eps",)
    default_epsilon: float = 1e-6
    zero_centred: bool = False

    def to_args(self, config, where, family):
        return {"normalization": self.kind, "norm_epsilon": config.get(first_key(config, self.epsilon), self.default_epsilon),
                **({"layernorm_zero_centered_gamma": True} if self.zero_centred else {})}

    def to_config(self, config, args, family):
        config[first_key(config, self.epsilon)] = args.norm_epsilon

    def problems(self, args, family):
        if args.normalization != self.kind:
            return [f"normalization {args.normalization} ({family.model_type} has {self.kind}; a family with "
                    f"{args.normalization} declares norm=Norm({args.normalization!r}, ...))"]
        if bool(zero_centred(args)) != self.zero_centred:
            return [f"layernorm_zero_centered_gamma {bool(zero_centred(args))} ({family.model_type}'s norms are "
                    f"{'' if self.zero_centred else 'not '}zero-centred; a family whose are declares "
                    "norm=Norm(..., zero_centred=True))"]
        return []

    def settings(self):
        return {"layernorm_zero_centered_gamma": True} if self.zero_centred else {}

    @property
    def bias(self):
        return self.kind == "LayerNorm"


def zero_centred(args):
    """Whether Megatron stores the norm weights minus one (today's name, or the older apply_layernorm_1p)."""
    return getattr(args, "layernorm_zero_centered_gamma", None) or getattr(args, "apply_layernorm_1p", False)


# Hugging Face activation names -> the activation Megatron-Core computes (see megatron_activation).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu2": "squared_relu"}
# The Megatron-LM args of each. Megatron-Core reads no tanh-GELU switch (openai_gelu is legacy-only): its
# non-gated GELU is tanh-approximate exactly when the bias-GELU fusion runs, i.e. with linear biases and
# bias_gelu_fusion (Megatron-LM's default), and exact otherwise (docs/research/megatron-activations.md).
MEGATRON_ACTIVATIONS = {("silu", True): {"swiglu": True},
                        ("gelu", False): {"swiglu": False, "bias_gelu_fusion": False},
                        ("gelu_tanh", False): {"swiglu": False, "bias_gelu_fusion": True},
                        ("squared_relu", False): {"swiglu": False, "squared_relu": True, "bias_gelu_fusion": False}}


def megatron_activation(args):
    """(activation, gated) that Megatron-Core computes for `args`."""
    if args.swiglu:
        return "silu", True
    if getattr(args, "squared_relu", False):
        return "squared_relu", False
    if args.add_bias_linear and getattr(args, "bias_gelu_fusion", True):
        return "gelu_tanh", False
    return "gelu", False


@dataclasses.dataclass(frozen=True)
class Activation(Feature):
    """The MLP's activation: `names` are the HF values the family accepts (the first is written for a
    model without a stored config), `gated` whether the MLP is gated (SwiGLU's gate and up halves),
    `key` the config keys naming it."""
    names: tuple = ("silu",)
    gated: bool = True
    key: tuple = ("hidden_act",)

    def to_args(self, config, where, family):
        key = first_key(config, self.key)
        name = config.get(key, self.names[0])
        require(name in self.names, f"{where}: {key} {name!r} is not one {family.model_type} maps "
                                    f"({', '.join(self.names)}); a family with it declares "
                                    f"activation=Activation(({name!r},), gated=...)")
        wanted = (HF_ACTIVATIONS.get(name), self.gated)
        require(wanted in MEGATRON_ACTIVATIONS, f"{where}: {key} {name!r} {'gated' if self.gated else 'ungated'} "
                                                "has no Megatron-LM equivalent")
        return dict(MEGATRON_ACTIVATIONS[wanted])

    def to_config(self, config, args, family):
        key = first_key(config, self.key)
        activation = megatron_activation(args)[0]
        if HF_ACTIVATIONS.get(config.get(key)) != activation:
            config[key] = next(name for name in self.names if HF_ACTIVATIONS.get(name) == activation)

    def problems(self, args, family):
        activation, gated = megatron_activation(args)
        if not args.add_bias_linear and "gelu_tanh" in map(HF_ACTIVATIONS.get, self.names) and activation == "gelu":
            return [f"{', '.join(self.names)} without linear biases (Megatron-Core's tanh GELU is its fused "
                    "bias-GELU; without biases it computes exact GELU)"]
        if gated != self.gated or all(HF_ACTIVATIONS.get(name) != activation for name in self.names):
            return [f"activation {'gated ' if gated else ''}{activation} ({family.model_type} has "
                    f"{'gated ' if self.gated else ''}{', '.join(self.names)})"]
        return []


@dataclasses.dataclass(frozen=True)
class Refused(Feature):
    """A config.json switch the family's HF code has but Megatron cannot express: refused when set,
    unless the family's args hold `unless` (e.g. Llama's attention_bias on a family with add_qkv_bias)."""
    key: str
    why: str
    unless: str = None

    def to_args(self, config, where, family):
        require(not config.get(self.key) or self.unless and family.args.get(self.unless),
                f"{where}: {self.key}={config.get(self.key)!r} ({self.why}) has no Megatron-Core equivalent")
        return {}


# Llama's MLP and attention bias switches: Megatron adds biases to every projection or to q, k, v only.
LLAMA_BIAS_SWITCHES = (Refused("mlp_bias", "biases on the MLP projections without the attention's"),
                       Refused("attention_bias", "biases on q, k, v and o without the MLP's", unless="add_qkv_bias"))
