"""Affect models and their registry.

Every model maps a batch of features to two heads:

- ``"emotion"``: categorical emotion logits, shape (B, n_classes) (cross-entropy);
- ``"av"``: arousal and valence in [-1, 1] (tanh), shape (B, 2) (loss ``1 - CCC``).

Models on sequences pool their frame outputs with a length-masked mean, and padding is masked
after every convolution block and packed away from the recurrent layers, so padded frames never
change a clip's output (in eval mode).

Registry (``MODELS``), each with the front-end it eats:

- ``egemaps-mlp``: eGeMAPSv02 functionals (Eyben et al. 2016) -> MLP 256-128 (~56k parameters,
  the small federated SER model of REFERENCES.md);
- ``logmel-crnn``: 64 log-Mel bands -> Conv1d 32, 64 + BiGRU(64), after FedAudio (~76k);
- ``wave-cnn-gru``: raw 16 kHz waveform -> the end-to-end convolutional front-end of Tzirakis,
  Zhang and Schuller, "End-to-end speech emotion recognition using deep neural networks",
  ICASSP 2018 (conv 64/128/256, kernels 8/6/6, max-pool 10/8/8, batch norm) -> GRU(64).

The federated state of a model is its floating-point ``state_dict`` entries (parameters and
batch-norm statistics), travelling in Flower messages as one flat array (:func:`to_record` /
:func:`load_record`); checkpoints keep the full ``state_dict``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .features import FrontEnd, get_frontend

if TYPE_CHECKING:  # flwr is imported where a record is built (centralised training needs none)
    from flwr.app import ArrayRecord

__all__ = [
    "AffectModel",
    "EgemapsMLP",
    "LogMelCRNN",
    "WaveCNNGRU",
    "ModelSpec",
    "MODELS",
    "build_model",
    "frontend_for",
    "count_parameters",
    "PACKED_KEY",
    "to_record",
    "load_record",
    "clippable_update",
    "for_inference",
    "copy_model",
    "masked_mean",
]


def _mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Boolean (B, steps): True on valid time steps."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of (B, T, H) restricted to the first ``lengths[b]`` steps -> (B, H)."""
    if lengths is None:
        return h.mean(dim=1)
    m = _mask(lengths, h.shape[1]).unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class AffectModel(nn.Module):
    """Base class: an encoder to a (B, hidden) embedding plus the two affect heads.

    Parameters
    ----------
    hidden : int
        Size of the embedding the heads read.
    n_classes : int
        Number of emotion categories.
    dropout : float
        Dropout on the embedding before the heads.
    """

    def __init__(self, hidden: int, n_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.n_classes = int(n_classes)
        self.drop = nn.Dropout(dropout)
        self.emotion = nn.Linear(hidden, n_classes)
        self.av = nn.Linear(hidden, 2)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns ``{"emotion": (B, n_classes) logits, "av": (B, 2) in [-1, 1]}``, on the
        model's device (``x`` is moved there; ``lengths`` may stay on the CPU)."""
        x = x.to(self.emotion.weight.device)
        z = self.drop(self.encode(x, lengths))
        return {"emotion": self.emotion(z), "av": torch.tanh(self.av(z))}


class EgemapsMLP(AffectModel):
    """MLP on the 88 eGeMAPSv02 functionals: 88 -> 256 -> 128 (ReLU, dropout 0.2) -> heads.

    Input (B, 88); ``lengths`` is ignored.
    """

    def __init__(self, n_classes: int, in_dim: int = 88, dropout: float = 0.2) -> None:
        super().__init__(128, n_classes, dropout)
        self.body = nn.Sequential(
            nn.Linear(in_dim, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 128), nn.ReLU())

    def encode(self, x, lengths=None):
        return self.body(x)


#: Default size, in values (channels x samples of a convolution's output), of the time chunks
#: an eval-mode sequence model computes a conv + max-pool block over: 256 K float32 values
#: (1 MiB) stay in a core's cache.
CHUNK_VALUES = 1 << 18
#: Fewest convolution outputs (samples) per chunk, so that large batches are not cut into many
#: tiny convolutions.
MIN_CHUNK = 1024


def _conv_pool(conv: nn.Sequential, x: torch.Tensor, pool: int, chunk_values: int) -> torch.Tensor:
    """``max_pool1d(conv(x), pool)`` for ``conv = Sequential(ConstantPad1d, Conv1d, per-channel
    map...)`` on (B, C_in, T), computed over time chunks when ``chunk_values > 0``.

    Each chunk covers whole pooling windows of the convolution's output plus the kernel's
    ``k - 1`` samples of context, so the result is the same sums as in one pass, up to the
    kernels' float rounding (~1e-7; the maps after the Conv1d must act per time step: an
    eval-mode batch norm, an Identity; the Conv1d has stride 1 and no dilation). What it
    saves is the full-resolution convolution output: wave-cnn-gru's first block writes 64 x
    64,000 values (16 MB) for a 4 s clip, a fresh allocation whose page faults and cache misses
    cost 4x its arithmetic on one core (22 ms -> 5 ms for that block). Not for training: a
    training-mode batch norm needs the statistics of the whole output.
    """
    if chunk_values <= 0 or any(m.training for m in conv if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        # training, chunking switched off, or a batch norm gathering statistics (AdaBN)
        return nn.functional.max_pool1d(conv(x), pool)
    pad, rest = conv[0], conv[1:]
    steps = x.shape[-1] // pool * pool  # max_pool1d drops a last partial window
    step = max(MIN_CHUNK // pool, chunk_values // max(rest[0].out_channels * x.shape[0], 1) // pool) * pool
    if step >= steps:  # one chunk would hold the whole output
        return nn.functional.max_pool1d(conv(x), pool)
    x = pad(x)
    halo = rest[0].kernel_size[0] - 1  # stride 1, no dilation: output t reads inputs t .. t + k - 1
    return torch.cat([nn.functional.max_pool1d(rest(x[..., s:min(s + step, steps) + halo]), pool)
                      for s in range(0, steps, step)], dim=-1)


class _ConvGRU(AffectModel):
    """Shared body of the sequence models: masked Conv1d blocks (conv, batch norm, max-pool,
    ReLU), then a (Bi)GRU over the valid frames and a length-masked mean.

    ``blocks`` is a list of ``(in_channels, out_channels, kernel, pool)``; the input is
    (B, T, C_in) or, for ``C_in == 1``, a waveform (B, T). ``lengths`` are in input frames or
    samples and are divided through every pool.

    ReLU comes after the max-pool: ``relu(maxpool(x)) == maxpool(relu(x))`` exactly (ReLU is
    monotonic), on ``pool`` times fewer values. A batch without padding (one clip on a device,
    or clips of one length) skips the masks and the packing of the GRU input, which change
    nothing there.
    """

    def __init__(self, n_classes, blocks, gru_hidden, bidirectional, dropout=0.2):
        super().__init__(gru_hidden * (2 if bidirectional else 1), n_classes, dropout)
        self.pools = [pool for *_, pool in blocks]
        self.convs = nn.ModuleList(
            nn.Sequential(nn.ConstantPad1d(((k - 1) // 2, k // 2), 0.0), nn.Conv1d(cin, cout, k),
                          nn.BatchNorm1d(cout))  # "same" length
            for cin, cout, k, _ in blocks)
        self.gru = nn.GRU(blocks[-1][1], gru_hidden, batch_first=True, bidirectional=bidirectional)
        self.min_steps = int(np.prod(self.pools))
        #: Eval mode computes each conv + pool over time chunks of about this many output values
        #: (0: whole clips); see :func:`_conv_pool`.
        self.chunk_values = CHUNK_VALUES

    def encode(self, x, lengths=None):
        x = x.unsqueeze(1) if x.dim() == 2 else x.transpose(1, 2)  # (B, C, T)
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[-1], dtype=torch.int64)
        lengths = lengths.to(torch.int64).cpu()
        if x.shape[-1] < self.min_steps:  # too short for the pools: zero-pad
            x = nn.functional.pad(x, (0, self.min_steps - x.shape[-1]))
        padded = bool((lengths < x.shape[-1]).any())
        if padded:
            x = x * _mask(lengths, x.shape[-1]).unsqueeze(1).to(x)
        for conv, pool in zip(self.convs, self.pools):
            x = torch.relu(_conv_pool(conv, x, pool, 0 if self.training else self.chunk_values))
            lengths = (lengths // pool).clamp(min=1)
            if padded:
                x = x * _mask(lengths, x.shape[-1]).unsqueeze(1).to(x)
        if not padded and bool((lengths == x.shape[-1]).all()):
            return self.gru(x.transpose(1, 2))[0].mean(dim=1)
        packed = pack_padded_sequence(x.transpose(1, 2), lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True)
        return masked_mean(h, lengths.to(h.device))


class LogMelCRNN(_ConvGRU):
    """CRNN on log-Mel (B, T, 64): Conv1d(64->32, k5)+BN+max-pool 2+ReLU, Conv1d(32->64, k5)+
    BN+max-pool 2+ReLU, BiGRU(64), masked mean -> heads (after FedAudio's CRNN)."""

    def __init__(self, n_classes: int, n_mels: int = 64, dropout: float = 0.2) -> None:
        super().__init__(n_classes, [(n_mels, 32, 5, 2), (32, 64, 5, 2)], 64, True, dropout)


class WaveCNNGRU(_ConvGRU):
    """End-to-end model on the raw waveform (B, T) at 16 kHz (Tzirakis et al., ICASSP 2018):
    Conv1d(1->64, k8)+BN+max-pool 10+ReLU, Conv1d(64->128, k6)+BN+max-pool 8+ReLU,
    Conv1d(128->256, k6)+BN+max-pool 8+ReLU (one frame per 40 ms), GRU(``gru_hidden``),
    masked mean -> heads."""

    def __init__(self, n_classes: int, gru_hidden: int = 64, dropout: float = 0.2) -> None:
        super().__init__(n_classes, [(1, 64, 8, 10), (64, 128, 6, 8), (128, 256, 6, 8)],
                         gru_hidden, False, dropout)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its ``name``, the ``frontend`` name it eats, ``build(n_classes)``
    returning a fresh module, and a one-line ``description``."""

    name: str
    frontend: str
    build: Callable[[int], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("egemaps-mlp", "egemaps", EgemapsMLP,
                  "eGeMAPSv02 functionals (88) -> MLP 256-128 (Eyben et al. 2016)"),
        ModelSpec("logmel-crnn", "logmel", LogMelCRNN,
                  "64 log-Mel bands -> Conv1d 32/64 + BiGRU(64) (FedAudio-style CRNN)"),
        ModelSpec("wave-cnn-gru", "wave", WaveCNNGRU,
                  "raw 16 kHz waveform -> CNN 64/128/256 (Tzirakis et al. 2018) + GRU(64)"),
    )
}


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def build_model(name: str, n_classes: int) -> nn.Module:
    """A freshly initialised model ``name`` with ``n_classes`` emotion classes.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known names.
    """
    return _spec(name).build(n_classes)


def frontend_for(name: str) -> FrontEnd:
    """The feature front-end (default settings) that model ``name`` eats. ValueError if unknown."""
    return get_frontend(_spec(name).frontend)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (same device, same mode) whose recurrent layers keep their
    weights in one contiguous block.

    ``copy.deepcopy`` copies a GRU's weights one tensor at a time; on a GPU, cuDNN then finds
    them scattered, warns ("RNN module weights are not part of single contiguous chunk of
    memory") and copies them into one block on every forward pass. ``flatten_parameters``
    puts them back in one block (a no-op on the CPU).
    """
    out = copy.deepcopy(model)
    for module in out.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()
    return out


def for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for on-device inference: eval mode, no gradients, and every batch
    norm folded into the convolution before it.

    In eval mode a batch norm is a fixed affine map per channel, so it can be absorbed into the
    preceding convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``):
    the outputs are the same up to float rounding (~1e-7), and one pass over the largest
    activations is saved (wave-cnn-gru: 64 channels x 64,000 samples for a 4 s clip). ``model``
    itself is left unchanged; the copy cannot be trained.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy_model(model).eval()
    for seq in out.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                if isinstance(seq[i], nn.Conv1d) and isinstance(seq[i + 1], nn.BatchNorm1d):
                    seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                    seq[i + 1] = nn.Identity()
    out.requires_grad_(False)
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: Key of the one array a model's federated state travels as in an ArrayRecord.
PACKED_KEY = "model"


def _federated_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point ``state_dict`` entries, in order: parameters and batch-norm statistics."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def to_record(model: nn.Module) -> ArrayRecord:
    """The model's federated state as a Flower ``ArrayRecord`` holding one flat float32 array.

    The array (key :data:`PACKED_KEY`, shape ``(n,)``) is every floating-point ``state_dict``
    entry (parameters and batch-norm running statistics) flattened and concatenated in
    ``state_dict`` order. Integer buffers (BatchNorm's ``num_batches_tracked``) stay on the
    device: averaging a counter means nothing, and it would use up a DP clipping norm.

    Why one array: Flower 1.41 moves each Array of a message as its own object, with its own
    HTTP request at every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), two
    at a time. A per-tensor record of ``logmel-crnn`` is 43 objects per message, this one is 3;
    on a localhost federation that was most of a round's time. Every strategy here (FedAvg,
    FairAvg, q-FedAvg, FedProx, the DP wrappers) is elementwise or uses the global norm, so
    they give the same result on the packed array.
    """
    from flwr.app import Array, ArrayRecord

    entries = _federated_entries(model)
    flat = np.concatenate([v.detach().cpu().reshape(-1).to(torch.float32).numpy() for v in entries.values()]) \
        if entries else np.zeros(0, dtype=np.float32)
    return ArrayRecord({PACKED_KEY: Array(flat)})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load a record made by :func:`to_record` into ``model`` (in place).

    A per-tensor record (keys = ``state_dict`` keys, as ``ArrayRecord(model.state_dict())``
    makes) is accepted too.

    Raises
    ------
    ValueError
        If the record does not fit the model (another model, or another number of emotion
        classes): the message gives both sizes.
    """
    if PACKED_KEY not in record:
        model.load_state_dict(record.to_torch_state_dict(), strict=True)
        return
    flat = record[PACKED_KEY].numpy().reshape(-1)
    entries = _federated_entries(model)
    expected = sum(v.numel() for v in entries.values())
    if flat.size != expected:
        raise ValueError(f"the record holds {flat.size} values but this {type(model).__name__} has {expected} "
                         "(another model, or another number of emotion classes?)")
    state, offset = model.state_dict(), 0
    for key, ref in entries.items():
        state[key] = torch.from_numpy(flat[offset:offset + ref.numel()].copy()).reshape(ref.shape).to(ref.dtype)
        offset += ref.numel()
    model.load_state_dict(state, strict=True)


def clippable_update(record: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """A device's weights made ready for DP clipping of ``record - reference`` (same keys).

    * Integer arrays (BatchNorm's ``num_batches_tracked``) are replaced by ``reference``'s:
      they are not learnt, would use up the clipping norm (a counter grows by the number of
      local batches) and would tell how many batches the device trained on.
    * An update that is exactly zero (a device with nothing to learn from, or a saturated
      model whose gradients are all zero) gets its first float entry moved by one ulp: Flower's
      flat clipping (``flwr.supercore.differential_privacy.clip_inputs_inplace``, Andrew et
      al., arXiv:1710.06963) divides by the update's norm and raises ``ZeroDivisionError`` on
      a zero update. One ulp (about ``1e-8`` relative) is far below the clipping norm and
      below what the noise and float32 averaging keep.

    Parameters
    ----------
    record, reference : flwr.app.ArrayRecord
        The device's weights and the global weights it started from; keys missing from
        ``reference`` are kept as they are.

    Returns
    -------
    flwr.app.ArrayRecord
        A new record, ``record`` unchanged.
    """
    from flwr.app import Array, ArrayRecord

    reference = {k: a.numpy() for k, a in reference.items()}
    out = {}
    for key, arr in record.items():
        value = arr.numpy()
        if np.issubdtype(value.dtype, np.integer) and key in reference:
            value = reference[key]
        out[key] = value
    floats = [k for k, v in out.items() if np.issubdtype(v.dtype, np.floating) and v.size and k in reference]
    if floats and all(np.array_equal(out[k], reference[k]) for k in floats):
        first = out[floats[0]].copy()
        flat = first.reshape(-1)
        flat[0] = np.nextafter(flat[0], np.inf, dtype=flat.dtype)
        out[floats[0]] = first
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})
