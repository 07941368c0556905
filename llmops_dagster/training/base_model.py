"""The base model: a small Llama built from a config with a BPE tokenizer trained on the training
split, saved as a Hugging Face folder; or any local `from_pretrained` folder or model id.

Either way the model is loaded back through `AutoModelForCausalLM.from_pretrained`, the same code a
real checkpoint goes through.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Token strings, not passwords (bandit B105 reads "_token" names as secrets).
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}  # nosec


class BaseModelError(ValueError):
    """The base model setting cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ScratchModelSpec:
    """Sizes of the Llama built from config (defaults: about 0.6M parameters, for 2 CPU cores)."""

    vocab_size: int = field(default=2000, metadata={"help": "BPE vocabulary (tokens); merges stop here."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    max_position_embeddings: int = field(default=256, metadata={"help": "Longest sequence (tokens)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialization."})


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    Digits are split into one token each before BPE runs: an order number such as A48399 is then six
    tokens the model can copy one by one from the question, instead of corpus-specific chunks
    ("483", "99") that an unseen number breaks into differently.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_scratch_model(texts: list[str], spec: ScratchModelSpec, folder: Path) -> None:
    """Train the tokenizer, build a randomly initialized Llama (seeded) and save both to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "llmops_spec.json").write_text(json.dumps(asdict(spec), indent=2))


SCRATCH_KIND, PRETRAINED_KIND = "scratch", "pretrained"


def tokenizer_corpus(accepted, template) -> list[str]:
    """What the scratch tokenizer learns from: each trusted training example rendered by `template`
    (a prompts/ renderer) with its response, as the prompt set will write it; never feedback rows
    (they change with every retrain)."""
    from llmops_dagster.prompts.templates import render_records

    rows = accepted[accepted["split"] == "train"]
    if "feedback_id" in rows:
        rows = rows[rows["feedback_id"].isna()]
    records = render_records(template, rows)
    return [p + c for p, c in zip(records["prompt"], records["completion"], strict=True)]


def has_chat_template(source: str) -> bool:
    """Whether the model's tokenizer brings a chat template (tokenizer_config.json or
    chat_template.jinja, where transformers keeps it)."""
    path = Path(source)
    config = path / "tokenizer_config.json"
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


SMALL_FILE_BYTES = 16 << 20  # files up to this size are hashed whole; weights by name and size


def folder_fingerprint(source: str) -> dict:
    """What identifies a model folder's contents without reading gigabytes of weights: the hash of
    each small file (config, tokenizer, chat template) and the size of each large one."""
    import hashlib

    path = Path(source)
    if not path.is_dir():
        return {}
    fingerprint = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        name = str(file.relative_to(path))
        fingerprint[name] = (hashlib.sha256(file.read_bytes()).hexdigest()[:16]
                             if size <= SMALL_FILE_BYTES else f"{size} bytes")
    return fingerprint


def check_loadable(source: str, setting: str = "base_model.source") -> None:
    """Fail early, naming the setting, when `source` is neither a model folder nor a cached id."""
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{setting} {source!r} is a folder without config.json: "
                                 f"not a Hugging Face model folder")
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"{setting} {source!r} does not exist")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except OSError as error:
        raise BaseModelError(f"{setting} {source!r} is not a local folder and could not be loaded "
                             f"as a model id ({error.__class__.__name__}: no hub is reachable here)"
                             ) from error


def describe(source: str) -> dict:
    """Architecture, parameter count and vocabulary of a model, loaded on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        "architecture": config.architectures[0] if config.architectures else config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
    }


def module_names(source: str) -> set[str]:
    """Names of the model's modules (last path component), from the meta device: no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


@dataclass(frozen=True)
class BaseModelProduct:
    """The base model a fine-tune starts from: its version, folder (or model id) and kind; as a
    hand-off also its parameter count and the template its tokenizer learned ("-": pretrained)."""

    version: str
    path: str
    kind: str
    parameters: int = 0
    tokenizer_template: str = "-"

    @classmethod
    def from_materialization(cls, version: str, metadata: dict) -> BaseModelProduct:
        """The product a base_model materialization of `version` describes. Its version is a
        content hash of the folder, and the folder is content-addressed (or the operator's own), so
        the materialization that carries the version is its record: there is no version table."""
        return cls(version=version, path=metadata["path"], kind=metadata.get("kind", SCRATCH_KIND),
                   parameters=int(metadata["parameters"]),
                   tokenizer_template=metadata.get("tokenizer_template", "-"))


def prepare_base_model(source: str, spec: ScratchModelSpec, tokenizer_template: str,
                       dataset_path: str, write_content_addressed) -> BaseModelProduct:
    """The base model `source` names: SCRATCH_KIND builds a small Llama from `spec` whose tokenizer
    learns the dataset's accepted rows rendered by the prompts/ template `tokenizer_template`,
    published by `write_content_addressed(kind, write)` (ArtifactStore's: version, folder);
    otherwise the pretrained folder or id `source`, checked loadable. A BaseModelError names the
    setting that cannot be used."""
    if source == SCRATCH_KIND:
        from llmops_dagster.dataset import dataset_store
        from llmops_dagster.infra.settings import PROMPTS_DIR
        from llmops_dagster.prompts import templates
        from llmops_dagster.prompts.rendering import RenderingError

        # The tokenizer learns from the source's training rows only: feedback rows change with every
        # retrain, and a base model (its vocabulary) that changed with them would make each retrain
        # start over from a new random model, where it can continue from production's adapter.
        try:
            template = templates.load_template(PROMPTS_DIR, tokenizer_template)
            texts = tokenizer_corpus(dataset_store.read_accepted(dataset_path), template)
        except RenderingError as error:
            raise BaseModelError(f"base_model.tokenizer_template: {error}") from error
        version, folder = write_content_addressed(
            "base_models", lambda d: build_scratch_model(texts, spec, d))
        return BaseModelProduct(version=version, path=str(folder), kind=SCRATCH_KIND)
    from llmops_dagster.training.launch import run_version

    check_loadable(source)
    # The folder's small files (config, tokenizer, chat template) and its weights' names and
    # sizes: a model saved again over the same folder is a new version.
    version = run_version({"source": source, "files": folder_fingerprint(source)})
    return BaseModelProduct(version=version, path=source, kind=PRETRAINED_KIND)
