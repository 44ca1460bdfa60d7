"""ViT encoders (timm, HF Dinov2) behind one interface: selected transformer blocks as patch maps.

Weights come from random init or a local checkpoint (``pretrained=``); nothing here downloads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from ..registry import MODELS

# Weight files looked up, in this order, when ``pretrained`` names a directory.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_HF_MODELS = {
    "dinov2": (Dinov2Config, Dinov2Model),
    "dinov2_with_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel),
}


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """Reads a local state dict without network access or pickled code.

    Args:
        path: A ``.safetensors`` file, a torch file (``.pth``/``.pt``/``.bin``/``.ckpt``, read with
            ``weights_only=True``), or a directory holding ``model.safetensors`` or
            ``pytorch_model.bin``. A torch file whose dict nests the weights under ``state_dict``
            or ``model`` is unwrapped.

    Returns:
        The state dict, on CPU.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"no weight file ({', '.join(_WEIGHT_FILES)}) in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (weights are never downloaded)")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint format {path.suffix!r} for {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    return dict(state)


def load_state_dict_checked(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool, source: str
) -> None:
    """Loads ``state_dict`` into ``module``; with ``strict``, key mismatches raise and are named.

    Shape mismatches always raise (``nn.Module.load_state_dict``).
    """
    result = module.load_state_dict(state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise KeyError(
            f"checkpoint {source} does not match {type(module).__name__}: "
            f"missing keys {sorted(result.missing_keys)}, "
            f"unexpected keys {sorted(result.unexpected_keys)} (pass strict=False to ignore)"
        )


class ViTEncoder(nn.Module):
    """Base of the ViT encoders: block selection, size checks, freezing.

    Subclasses build the wrapped model, call ``_finish_init`` and implement ``_run_blocks``,
    ``_block_list`` and ``_output_parameters``.

    Args:
        frozen: Disable gradients of all parameters and keep the module in eval mode.
    """

    def __init__(self, *, frozen: bool = False) -> None:
        super().__init__()
        self.frozen = frozen

    @property
    def patch_size(self) -> int:
        """Input pixels per patch side."""
        return self._patch_size

    @property
    def embed_dim(self) -> int:
        """Channels C of every block output."""
        return self._embed_dim

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self._block_list())

    def _run_blocks(self, images: Tensor, indices: list[int]) -> list[Tensor]:
        """Returns (B, C, h, w) maps of the blocks ``indices`` (non-negative, increasing)."""
        raise NotImplementedError

    def _block_list(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        raise NotImplementedError

    def _output_parameters(self) -> list[nn.Parameter]:
        """Parameters never on the path to block outputs (final norm, head, mask token)."""
        raise NotImplementedError

    def _finish_init(self, *, patch_size: int | Sequence[int], embed_dim: int) -> None:
        # Called by subclasses once the wrapped model exists. Parameters that cannot reach the
        # block outputs get no gradient; they would break DDP (unused parameters) and an
        # optimizer would only decay them, so they are excluded from training.
        self._patch_size = _square(patch_size, type(self).__name__)
        self._embed_dim = int(embed_dim)
        for param in self._output_parameters():
            param.requires_grad_(False)
        if self.frozen:
            self.requires_grad_(False)
        self.train(self.training)

    def freeze_blocks_after(self, index: int) -> None:
        """Excludes blocks after ``index`` (resolved, non-negative) from training.

        For a consumer set whose deepest block is ``index``, later blocks get no gradient (see
        ``_finish_init``); their weights stay so checkpoints still load strictly.
        """
        for block in self._block_list()[index + 1 :]:
            block.requires_grad_(False)

    def train(self, mode: bool = True) -> ViTEncoder:
        """Sets train mode, except that a frozen encoder always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def init_weights(self) -> None:
        """Keeps the weights set at construction (random init or ``pretrained``).

        mmengine's ``BaseModule.init_weights`` calls ``init_weights`` of children that have one;
        without this override it would reach timm's/HF's and re-randomise loaded weights.
        """

    def resolve_blocks(self, blocks: Sequence[int]) -> list[int]:
        """Maps block indices (negative ones count from the end) to ``[0, num_blocks)``."""
        if len(blocks) == 0:
            raise ValueError(f"{type(self).__name__}: select at least one block")
        resolved = []
        for index in blocks:
            if not -self.num_blocks <= int(index) < self.num_blocks:
                raise IndexError(
                    f"{type(self).__name__}: block {index} out of range for {self.num_blocks} "
                    "blocks"
                )
            resolved.append(int(index) % self.num_blocks)
        return resolved

    def forward(self, images: Tensor, blocks: Sequence[int]) -> list[Tensor]:
        """Runs the encoder once and returns the outputs of the selected blocks.

        Args:
            images: (B, 3, H, W) normalised images; H and W multiples of ``patch_size``.
            blocks: Block indices; negative ones count from the end; repeats allowed.

        Returns:
            One (B, C, H / patch_size, W / patch_size) patch map per entry of ``blocks``, in
            that order, without class or register tokens.
        """
        self._check_images(images)
        indices = self.resolve_blocks(blocks)
        # A frozen encoder needs no activation graph unless gradients w.r.t. the images are asked.
        grad = torch.is_grad_enabled() and (not self.frozen or images.requires_grad)
        with torch.set_grad_enabled(grad):
            unique = sorted(set(indices))
            by_index = dict(zip(unique, self._run_blocks(images, unique), strict=True))
        return [by_index[i] for i in indices]

    def forward_blocks(self, images: Tensor, blocks: Sequence[int]) -> list[Tensor]:
        """Same as calling the module (so forward hooks fire); see :meth:`forward`."""
        return self(images, blocks)

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects images (B, 3, H, W), got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{type(self).__name__}: image size {height}x{width} is not a multiple of the "
                f"patch size {self.patch_size}; pad the batch (ProposerDataPreprocessor)"
            )


def _square(size: int | Sequence[int], owner: str) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{owner} supports square patches only, got {tuple(size)}")
    return int(size[0])


def _timm_filter_fn(model: nn.Module) -> Callable[..., dict[str, Tensor]] | None:
    # timm keeps each family's checkpoint converter (original DINOv2/CLIP keys, pos-embed
    # resampling to ``img_size``) next to the model class, as ``checkpoint_filter_fn``.
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


@MODELS.register_module()
class TimmViTEncoder(ViTEncoder):
    """A timm ViT, read out with ``forward_intermediates``.

    Args:
        model_name: timm model name, e.g. ``vit_large_patch14_dinov2``; ``timm_kwargs`` override
            its architecture (``depth``, ``embed_dim``, ``num_heads``, ``patch_size``, ...).
        pretrained: Local checkpoint file or directory (see :func:`load_checkpoint_file`), in
            timm or original (e.g. DINOv2) key format; position embeddings are resampled to
            ``img_size``. Defaults to None (random init).
        img_size: Size the absolute position embeddings are stored at; other input sizes
            interpolate them (``dynamic_img_size``). Defaults to 224.
        frozen: Disable gradients and keep eval mode. Defaults to False.
        strict: Raise on missing or unexpected checkpoint keys. Defaults to True.
        **timm_kwargs: Passed to ``timm.create_model``.
    """

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: str | None = None,
        img_size: int = 224,
        frozen: bool = False,
        strict: bool = True,
        **timm_kwargs: object,
    ) -> None:
        super().__init__(frozen=frozen)
        self.model = timm.create_model(
            model_name,
            pretrained=False,
            dynamic_img_size=True,
            img_size=img_size,
            num_classes=0,
            **timm_kwargs,
        )
        if not hasattr(self.model, "forward_intermediates"):
            raise TypeError(f"timm model {model_name} has no forward_intermediates")
        if pretrained is not None:
            self._load(pretrained, strict=strict)
        self._finish_init(
            patch_size=self.model.patch_embed.patch_size, embed_dim=self.model.embed_dim
        )

    def _load(self, pretrained: str, *, strict: bool) -> None:
        state_dict = load_checkpoint_file(pretrained)
        filter_fn = _timm_filter_fn(self.model)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, self.model)
        # The classifier is dropped (num_classes=0), so checkpoint head weights are not expected.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        load_state_dict_checked(self.model, state_dict, strict=strict, source=str(pretrained))

    def _block_list(self) -> nn.ModuleList:
        return self.model.blocks

    def _output_parameters(self) -> list[nn.Parameter]:
        # forward_intermediates(norm=False) stops before the final norm, pooling and head.
        names = ("norm", "fc_norm", "attn_pool", "head")
        modules = [getattr(self.model, name, None) for name in names]
        return [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]

    def _run_blocks(self, images: Tensor, indices: list[int]) -> list[Tensor]:
        return self.model.forward_intermediates(
            images, indices=indices, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )


@MODELS.register_module()
class HFDinov2Encoder(ViTEncoder):
    """A transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``), read from hidden states.

    Args:
        config: ``Dinov2Config`` kwargs for a randomly initialised model, or the architecture a
            ``pretrained`` weight file is loaded into; ``model_type="dinov2_with_registers"``
            selects the register variant. Must be None when ``pretrained`` is a directory with
            a ``config.json`` (``save_pretrained`` layout).
        pretrained: Local ``save_pretrained`` directory, or a weight file / directory without
            ``config.json`` loaded into the model built from ``config``. Defaults to None.
        frozen: Disable gradients and keep eval mode. Defaults to False.
        strict: Raise on missing or unexpected checkpoint keys. Defaults to True.
    """

    def __init__(
        self,
        *,
        config: dict | None = None,
        pretrained: str | None = None,
        frozen: bool = False,
        strict: bool = True,
    ) -> None:
        super().__init__(frozen=frozen)
        if pretrained is not None and (Path(pretrained) / "config.json").is_file():
            if config is not None:
                raise ValueError(
                    f"{type(self).__name__}: config comes from {pretrained}/config.json; "
                    "pass config=None"
                )
            self.model = self._from_pretrained(pretrained, strict=strict)
        elif config is None:
            raise ValueError(f"{type(self).__name__} needs a config dict or a pretrained dir")
        else:
            config = dict(config)
            config_cls, model_cls = _hf_classes(config.pop("model_type", "dinov2"))
            self.model = model_cls(config_cls(**config))
            if pretrained is not None:
                state_dict = load_checkpoint_file(pretrained)
                load_state_dict_checked(self.model, state_dict, strict=strict, source=pretrained)
        config = self.model.config
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0))
        self._finish_init(patch_size=config.patch_size, embed_dim=config.hidden_size)

    @staticmethod
    def _from_pretrained(directory: str, *, strict: bool) -> nn.Module:
        model_type = AutoConfig.from_pretrained(directory, local_files_only=True).model_type
        _, model_cls = _hf_classes(model_type)
        model, info = model_cls.from_pretrained(
            directory, local_files_only=True, output_loading_info=True
        )
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if strict and bad:
            raise KeyError(f"checkpoint {directory} does not match {model_cls.__name__}: {bad}")
        return model

    def _block_list(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def _output_parameters(self) -> list[nn.Parameter]:
        # The final layernorm only feeds last_hidden_state; mask_token only masked pre-training.
        return [*self.model.layernorm.parameters(), self.model.embeddings.mask_token]

    def _run_blocks(self, images: Tensor, indices: list[int]) -> list[Tensor]:
        hidden_states = self.model(pixel_values=images, output_hidden_states=True).hidden_states
        batch, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        maps = []
        for index in indices:
            # hidden_states[0] is the embedding output; block i is hidden_states[i + 1].
            tokens = hidden_states[index + 1][:, self.num_prefix_tokens :]
            # (B, h*w, C) -> (B, C, h, w)
            maps.append(tokens.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous())
        return maps


def _hf_classes(model_type: str) -> tuple[type, type]:
    if model_type not in _HF_MODELS:
        raise ValueError(f"HFDinov2Encoder: unsupported model_type {model_type!r}")
    return _HF_MODELS[model_type]
