"""Mixture of experts: how a family's config.json spells its expert settings, mapped to and from
Megatron-Core's MoE args and router settings."""

import dataclasses

from converter_core.errors import require
from converter_core.formats.untrusted import is_count
from converter_core.hf_family.features import Feature, first_key
from converter_core.megatron import args as megatron_args


@dataclasses.dataclass(frozen=True)
class Experts(Feature):
    """How a family's config.json spells its mixture-of-experts settings. `count`: keys of the expert
    count, the first present wins; `ffn`: each expert's hidden size; `normalize`: True when the top-k
    weights are always renormalised, else the key of that bool (absent: false); `dense_layers` /
    `sparse_step`: keys of the dense-layer list and of "every Nth layer is MoE"; `first_dense`: key of
    "the first N layers are dense". Routing with groups and score bias: `score` "softmax" or "sigmoid"; `expert_bias`:
    the router has a score-correction bias; `groups`: keys of (group count, groups chosen per token);
    `scaling`: key of the routed-weight scale; `shared`: key of the shared-expert count (each expert_ffn wide);
    `optional`: the family has dense members too: experts only when the count is set."""
    count: tuple = ("num_local_experts",)
    ffn: str = "intermediate_size"
    normalize: object = True
    dense_layers: str = None
    sparse_step: str = None
    first_dense: str = None
    score: str = "softmax"
    expert_bias: bool = False
    groups: tuple = None
    scaling: str = None
    shared: str = None
    optional: bool = False

    def in_config(self, config):
        """Whether a config.json of the family describes experts."""
        return not self.optional or any(config.get(key) for key in self.count)

    def to_args(self, config, where, family):
        return moe_args(config, self, where) if self.in_config(config) else {}

    def to_config(self, config, args, family):
        moe_config(config, args, self)

    def problems(self, args, family):
        return routing_problems(args, self) if any(megatron_args.moe_layers(args)) else []

    def settings(self):
        return {"num_experts": not self.optional}


def routing_problems(args, experts):
    """Megatron router settings the family's HF router (`experts`: its Experts) does not have."""
    problems = []
    score = getattr(args, "moe_router_score_function", "softmax")
    if score != experts.score:
        problems.append(f"moe_router_score_function {score!r} ({experts.score} only)")
    supported = {"moe_router_enable_expert_bias": experts.expert_bias, "moe_router_num_groups": experts.groups,
                 "moe_router_topk_scaling_factor": experts.scaling, "moe_shared_expert_gate": False}
    for name, has in supported.items():
        if getattr(args, name, None) and not has:
            problems.append(f"{name} {getattr(args, name)!r} has no Hugging Face equivalent in this family")
    problems += [problem for problem in (group_problem(args), sigmoid_problem(args)) if problem]
    return problems


def group_problem(args):
    """Megatron-Core scores an expert group by its top topk/group_topk experts, the Hugging Face
    grouped routers by their top 2: they agree only when topk == 2 x group_topk (or grouping is off)."""
    groups, chosen, topk = getattr(args, "moe_router_num_groups", None), getattr(args, "moe_router_group_topk", None), \
        args.moe_router_topk
    if groups and chosen and topk != 2 * chosen:
        return (f"moe_router_group_topk {chosen} with moe_router_topk {topk}: Megatron-Core scores groups by their top "
                f"{topk // chosen} experts, Hugging Face by their top 2 (convertible only when topk = 2 x group_topk)")
    return None


def sigmoid_problem(args):
    """Megatron-Core always renormalises sigmoid top-k weights (top-k > 1); the HF config must too."""
    if getattr(args, "moe_router_score_function", "softmax") == "sigmoid" and args.moe_router_pre_softmax:
        return "moe_router_pre_softmax with sigmoid scores has no Hugging Face equivalent"
    return None


def moe_pattern(config, experts, layers):
    """Per layer, 1 for a MoE layer, as the family's config spells it (dense-layer list, every Nth layer
    MoE, the first N dense)."""
    dense = config.get(experts.dense_layers) or [] if experts.dense_layers else []
    step = config.get(experts.sparse_step) or 1 if experts.sparse_step else 1
    first = config.get(experts.first_dense) or 0 if experts.first_dense else 0
    return [int(i >= first and i not in dense and (i + 1) % step == 0) for i in range(layers)]


def moe_args(config, experts, where):
    """Megatron's MoE args from a config.json, as its Experts spells them."""
    count_key = next((key for key in experts.count if config.get(key) is not None), experts.count[0])
    count, topk, ffn = config.get(count_key), config.get("num_experts_per_tok"), config.get(experts.ffn)
    for name, value in ((count_key, count), ("num_experts_per_tok", topk), (experts.ffn, ffn)):
        require(is_count(value), f"{where}: {name} must be a positive integer, got {value!r:.40}")
    require(topk <= count, f"{where}: num_experts_per_tok {topk} exceeds the {count} experts")
    if experts.sparse_step and config.get(experts.sparse_step) is not None:
        require(is_count(config[experts.sparse_step]),
                f"{where}: {experts.sparse_step} must be a positive integer, got {config[experts.sparse_step]!r:.40}")
    dense = config.get(experts.dense_layers) if experts.dense_layers else None
    require(dense is None or isinstance(dense, list) and all(isinstance(i, int) for i in dense),
            f"{where}: {experts.dense_layers} must be a list of layer numbers")
    first = config.get(experts.first_dense) if experts.first_dense else None
    require(first is None or isinstance(first, int) and not isinstance(first, bool) and first >= 0,
            f"{where}: {experts.first_dense} must be a layer count, got {first!r:.40}")
    pattern = moe_pattern(config, experts, config["num_hidden_layers"])
    require(any(pattern), f"{where}: the config's dense-layer settings leave no MoE layer")
    normalize = experts.normalize is True or bool(config.get(experts.normalize, False))
    fields = dict(num_experts=count, moe_router_topk=topk, moe_ffn_hidden_size=ffn,
                  moe_layer_freq=1 if all(pattern) else pattern, moe_router_score_function=experts.score,
                  moe_router_pre_softmax=not normalize and experts.score == "softmax", moe_grouped_gemm=False)
    if experts.score == "sigmoid":
        require(normalize or topk == 1, f"{where}: {experts.normalize}=false with sigmoid scores has no Megatron-Core "
                                        "equivalent (it always renormalises the top-k weights)")
        fields["moe_router_dtype"] = "fp32"  # the HF router runs in float32
    if experts.expert_bias:
        fields["moe_router_enable_expert_bias"] = True
    if experts.groups:
        groups, chosen = (config.get(key) for key in experts.groups)
        for key, value in zip(experts.groups, (groups, chosen)):
            require(is_count(value), f"{where}: {key} must be a positive integer, got {value!r:.40}")
        require(count % groups == 0, f"{where}: {experts.groups[0]} {groups} does not divide the {count} experts")
        if chosen < groups:  # else every group is chosen and grouping changes nothing
            require(topk == 2 * chosen, f"{where}: {experts.groups[1]} {chosen} with num_experts_per_tok {topk}: "
                                        "Megatron-Core scores groups by their top topk/group_topk experts, Hugging "
                                        "Face by their top 2; convertible only when num_experts_per_tok = 2 x "
                                        f"{experts.groups[1]}")
            fields.update(moe_router_num_groups=groups, moe_router_group_topk=chosen)
    if experts.scaling and config.get(experts.scaling) is not None:
        fields["moe_router_topk_scaling_factor"] = float(config[experts.scaling])
    if experts.shared and config.get(experts.shared):
        require(is_count(config[experts.shared]),
                f"{where}: {experts.shared} must be a positive integer, got {config[experts.shared]!r:.40}")
        fields["moe_shared_expert_intermediate_size"] = config[experts.shared] * ffn
    if config.get("router_aux_loss_coef") is not None:
        fields["moe_aux_loss_coeff"] = float(config["router_aux_loss_coef"])
    return fields


def moe_config(config, args, experts, where="config.json"):
    """Write the args' MoE settings into config.json in the family's spelling (in place)."""
    if not getattr(args, "num_experts", None):  # a dense model: every layer dense, if the family can say so
        if experts.optional:
            return
        require(experts.first_dense, f"{where}: a model without experts cannot be written as this MoE family")
        config[experts.first_dense] = args.num_layers
        return
    count_key = first_key(config, experts.count)
    expert_ffn = megatron_args.expert_ffn_size(args)
    config.update({count_key: args.num_experts, "num_experts_per_tok": args.moe_router_topk, experts.ffn: expert_ffn})
    if experts.normalize is not True:
        config[experts.normalize] = not args.moe_router_pre_softmax
    if experts.groups:
        grouped = args.moe_router_num_groups and args.moe_router_group_topk
        if grouped or experts.groups[0] not in config:  # ungrouped: one group, chosen
            config.update(zip(experts.groups, (args.moe_router_num_groups, args.moe_router_group_topk) if grouped
                              else (1, 1)))
    if experts.scaling:
        config[experts.scaling] = float(args.moe_router_topk_scaling_factor or 1.0)
    if experts.shared:
        shared = args.moe_shared_expert_intermediate_size or 0
        require(shared % expert_ffn == 0, f"{where}: shared experts {shared} wide are not whole experts of {expert_ffn}")
        config[experts.shared] = shared // expert_ffn
    pattern = [int(moe) for moe in megatron_args.moe_layers(args)]
    if pattern == moe_pattern(config, experts, len(pattern)):
        return  # the stored spelling already says it
    first_moe = pattern.index(1) if any(pattern) else len(pattern)
    if experts.first_dense and all(pattern[first_moe:]):
        config[experts.first_dense] = first_moe
    elif experts.dense_layers:
        config[experts.dense_layers] = [i for i, moe in enumerate(pattern) if not moe]
        if experts.sparse_step:
            config[experts.sparse_step] = 1
    require(pattern == moe_pattern(config, experts, len(pattern)),
            f"{where}: the MoE layer pattern {pattern} cannot be written in this family's config")
