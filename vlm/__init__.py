"""vlm-xray: zero-/few-shot medical image reading with CLIP-style vision-language models.

Research software, not a diagnostic device.

    from vlm import load_model, load_label_set, Scorer
    scorer = Scorer(load_model("vlm-xray-starter"), load_label_set("chestxray14"))
    result = next(scorer.score(["chest.png"], threshold=0.4))
"""
from .images import Image, ImageLoadError, load_image
from .labels import LabelSet, LabelSetError, list_label_sets, load_label_set
from .models import Backbone, ModelLoadError, list_models, load_model
from .results import Finding, ImageFailure, ImageResult
from .scoring import Scorer, score_image

__version__ = "0.1.0"
__all__ = ["Image", "ImageLoadError", "load_image", "LabelSet", "LabelSetError", "list_label_sets",
           "load_label_set", "Backbone", "ModelLoadError", "list_models", "load_model", "Finding",
           "ImageFailure", "ImageResult", "Scorer", "score_image"]
