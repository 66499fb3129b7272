"""Interactive web app (``hf-sam-peft app``): click on your own image, compare the base SAM with adapters.

Model handling (:mod:`.models`) and the page's logic (:mod:`.session`) need no browser and no Gradio; only
:mod:`.ui` imports Gradio (the ``[app]`` extra).
"""

from hf_sam_peft.app.models import BASE_NAME, AdapterInfo, ModelBank
from hf_sam_peft.app.session import MODES, AppLogic, Session, load_app_image, render

INSTALL_HINT = "the app needs Gradio: pip install 'hf-sam-peft[app]'"

__all__ = [
    "BASE_NAME", "INSTALL_HINT", "MODES", "AdapterInfo", "AppLogic", "ModelBank", "Session", "load_app_image", "render",
]
