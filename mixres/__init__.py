"""mixres: resolution adapters for multimodal LLMs, as composable ``nn.Module``s.

The public face: ``create_*`` / ``list_*`` / ``register_*`` for every kind (fusion, projector,
pathway, encoder), :func:`build` for configs, the grid ops and the main classes. Importing
mixres imports torch and einops only; transformers, open_clip and timm load when a pathway that
needs them is built.
"""

from __future__ import annotations

from . import anyres, compressors, grid, multiscale
from .compressors import CAbstractor, Compressor, TokenPacker
from .encoders import Encoder
from .encoders.anyres import AnyResEncoder
from .encoders.dual import DualPathwayEncoder
from .encoders.factory import create_encoder
from .encoders.s2 import S2Encoder
from .errors import CheckpointError, ConfigError, DeviceError, MixresError, ShapeError, UnknownNameError, WeightsError
from .fusions import Fusion, MRAdapter, MRFinalFusion
from .grid import map_to_tokens, resample, resample_pos_embed, tokens_to_map
from .multiscale import s2_forward
from .pathways import MapPathway, TokenPathway
from .projectors import IdentityProjector, LinearProjector, MLPProjector
from .registry import (
    ENCODERS,
    FUSIONS,
    PATHWAYS,
    PROJECTORS,
    Configurable,
    Registry,
    build,
    create_fusion,
    create_pathway,
    create_projector,
    list_encoders,
    list_fusions,
    list_pathways,
    list_projectors,
    load_plugins,
    register_encoder,
    register_encoder_preset,
    register_fusion,
    register_fusion_preset,
    register_pathway,
    register_pathway_preset,
    register_projector,
    register_projector_preset,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "grid",
    "anyres",
    "compressors",
    "multiscale",
    "s2_forward",
    "CAbstractor",
    "Compressor",
    "TokenPacker",
    "AnyResEncoder",
    "DualPathwayEncoder",
    "S2Encoder",
    "build",
    "load_plugins",
    "Configurable",
    "Registry",
    "ENCODERS",
    "FUSIONS",
    "PATHWAYS",
    "PROJECTORS",
    "create_encoder",
    "create_fusion",
    "create_pathway",
    "create_projector",
    "list_encoders",
    "list_fusions",
    "list_pathways",
    "list_projectors",
    "register_encoder",
    "register_encoder_preset",
    "register_fusion",
    "register_fusion_preset",
    "register_pathway",
    "register_pathway_preset",
    "register_projector",
    "register_projector_preset",
    "tokens_to_map",
    "map_to_tokens",
    "resample",
    "resample_pos_embed",
    "Fusion",
    "Encoder",
    "MRAdapter",
    "MRFinalFusion",
    "TokenPathway",
    "MapPathway",
    "LinearProjector",
    "MLPProjector",
    "IdentityProjector",
    "MixresError",
    "DeviceError",
    "CheckpointError",
    "ShapeError",
    "ConfigError",
    "UnknownNameError",
    "WeightsError",
]
