"""Typed config of `raytrain synth` (conf/synth.yaml and the conf/synth/ group); [U] marks the spec's unverified
defaults, kept configurable."""

from __future__ import annotations

from dataclasses import dataclass, field

from raytrain.pipelines.ctrlsynth.llm import LLMConfig
from raytrain.pipelines.ctrlsynth.policy import PolicyConfig
from raytrain.pipelines.ctrlsynth.t2i import T2IConfig
from raytrain.pipelines.ctrlsynth.tagger import TaggerConfig
from raytrain.pipelines.ctrlsynth.tags import KINDS

PATHS = ("SP1", "SP2", "SP3", "SP4")
TEXT_PATHS = ("SP1", "SP2", "SP3")  # paths whose caption the LLM writes
IMAGE_PATHS = ("SP3", "SP4")  # paths whose image the T2I stage draws


@dataclass
class PoolConfig:
    taggers: int = 1  # actors holding the tagger (decompose, and the image filter's second tagger)
    llms: int = 1  # actors holding the caption LLM (one engine each)
    t2i: int = 1  # actors holding the text-to-image backend
    cpus: float = 0.5  # Ray CPUs each actor or task reserves: the three pools of one actor fit on 2 CPUs
    llm_gpus: float = 0.0  # GPUs each LLM actor reserves (the engine runs on CUDA when it gets one)
    batch_size: int = 16  # records per Ray Data batch (the LLM decodes a batch's captions together)


@dataclass
class SynthConfig:
    paths: list[str] = field(default_factory=lambda: ["SP1", "SP2", "SP3"])  # spec 3.2: "mix"; SP4 off
    policy: str = "keep"  # a key of `policies`
    policies: dict[str, PolicyConfig] = field(default_factory=lambda: {"keep": PolicyConfig()})
    tau_text: float = 0.5  # [U] text coverage threshold
    tau_image: float = 0.5  # [U] image tag-match threshold
    tau_precision: float = 0.0  # share of the caption's objects (with counts) that must be required ones; 0 = off
    text_cover: list[str] = field(default_factory=lambda: ["object"])  # [U] tag kinds the caption must cover
    image_cover: list[str] = field(default_factory=lambda: ["object"])  # [U] kinds the new image must show
    seed: int = 0
    dedupe: bool = True  # trap 11: drop a pair whose image and (near-exact) caption an earlier pair already has
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(backend="template"))
    t2i: T2IConfig = field(default_factory=T2IConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        bad = [p for p in self.paths if p not in PATHS]
        if bad or not self.paths:
            raise ValueError(f"paths={self.paths}; expected a non-empty list of {', '.join(PATHS)}")
        if self.policy not in self.policies:
            raise ValueError(f"policy={self.policy!r} is not one of the policies: {', '.join(self.policies)}")
        for name, kinds in (("text_cover", self.text_cover), ("image_cover", self.image_cover)):
            if not kinds or any(k not in KINDS for k in kinds):
                raise ValueError(f"{name}={kinds}; expected a non-empty list of {', '.join(KINDS)}")
        if not all(0 <= t <= 1 for t in (self.tau_text, self.tau_image, self.tau_precision)):
            raise ValueError(f"tau_text={self.tau_text}, tau_image={self.tau_image}, "
                             f"tau_precision={self.tau_precision}: thresholds lie in [0, 1]")

    @property
    def active_policy(self) -> PolicyConfig:
        return self.policies[self.policy]
