"""The Gradio page: widgets wired to :class:`~hf_sam_peft.app.session.AppLogic` (all logic lives there).

Every event goes through :func:`_guarded`, so bad input (an unreadable file, a volume, a click before an
upload) becomes a one-line message in the page's status line, never a stack trace.
No ``from __future__ import annotations`` here: Gradio reads the real ``gr.SelectData`` annotation.
"""

import functools
import html
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from hf_sam_peft.app.session import MAX_UPLOAD_BYTES, MODES, AppLogic, Session

__all__ = ["build_app", "launch"]

_log = logging.getLogger(__name__)
HELP = (
    "Upload a 2D image (png/tif/jpg, grey or RGB, any bit depth), then click on it: positive or negative "
    "points, or two clicks for a box. Switch the model to compare the base SAM with each adapter on the same "
    "prompts. *Segment all* runs automatic instance segmentation with an adapter's UNETR decoder."
)


def _message(error: Exception) -> str:
    # the first line only: the status line shows one line
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # shown as Markdown: escaped, so a file name or value with <...> stays text
    return f"⚠️ **Error:** {html.escape(text)}"


def build_app(logic: AppLogic, title: str = "hf-sam-peft: SAM + adapters"):
    """A ``gr.Blocks`` app for ``logic`` (not launched)."""
    def outputs(session: Session, message: str | None = None) -> tuple:
        status = logic.status(session) if message is None else f"{message}\n\n{logic.status(session)}"
        # in the order of `shown` below, the outputs every event is wired to
        return session, logic.picture(session), status, session.prompt_text(), logic.export(session)

    def _guarded(action: Callable[..., None]) -> Callable[..., tuple]:
        @functools.wraps(action)  # Gradio reads the signature (e.g. to pass gr.SelectData)
        def handler(session: Session | None, *args: Any) -> tuple:
            # gr.State(None) starts empty: a tab's Session is made on its first event
            session = session if session is not None else Session(model=logic.bank.names[0])
            try:
                action(session, *args)
            # expected failures (bad input, a click before an upload): the message only, nothing logged
            except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
                return outputs(session, _message(error))
            except Exception as error:  # never a stack trace in the page; keep it in the server log
                _log.exception("app event failed")
                return outputs(session, _message(error))
            return outputs(session)

        return handler

    def on_upload(session: Session, file: Any) -> None:
        if file is None:
            return
        # a path with type="filepath"; a file object is taken by its .name
        logic.load(session, file if isinstance(file, str) else getattr(file, "name", file))

    def on_select(session: Session, mode: str, evt: gr.SelectData) -> None:
        if not isinstance(evt.index, (list, tuple)) or len(evt.index) != 2:
            raise ValueError("click on the image to add a prompt")
        # gr.Image's select event gives index [x, y] in image pixels
        logic.click(session, int(evt.index[0]), int(evt.index[1]), mode)

    with gr.Blocks(title=title) as app:
        # per browser tab: Gradio keeps a State's value per session
        session = gr.State(None)
        gr.Markdown(f"## {title}\n{HELP}")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Image", type="filepath", elem_id="image-upload")
                model = gr.Radio(logic.bank.names, value=logic.bank.names[0], label="Model", elem_id="model")
                mode = gr.Radio(list(MODES), value=MODES[0], label="Click adds", elem_id="mode")
                with gr.Row():
                    clear = gr.Button("Clear prompts", elem_id="clear")
                    segment_all = gr.Button("Segment all", elem_id="segment-all")
                prompts = gr.Textbox(label="Prompts (x, y)", interactive=False, elem_id="prompts")
                download = gr.File(label="Label image", interactive=False, elem_id="download")
            with gr.Column(scale=3):
                status = gr.Markdown("Upload an image to start.", elem_id="status")
                picture = gr.Image(
                    label="Image + mask", type="numpy", format="png", interactive=False, elem_id="picture"
                )
        shown = [session, picture, status, prompts, download]
        upload.change(_guarded(on_upload), [session, upload], shown)
        picture.select(_guarded(on_select), [session, mode], shown)
        model.change(_guarded(logic.set_model), [session, model], shown)
        clear.click(_guarded(logic.clear), [session], shown)
        segment_all.click(_guarded(logic.segment_all), [session], shown)
    return app


def launch(logic: AppLogic, port: int | None = None, host: str = "127.0.0.1", **kwargs: Any) -> None:
    """Serve the app on ``host:port`` (loopback by default) until interrupted; uploads over
    :data:`~hf_sam_peft.app.session.MAX_UPLOAD_BYTES` are refused by the server itself."""
    app = build_app(logic)
    kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)
    # one event at a time: all tabs share the bank's models (ModelBank.use holds a lock anyway); share=False:
    # no public tunnel; allowed_paths: Gradio serves files only from there (the exports for the download box)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, allowed_paths=[str(logic.out_dir)], **kwargs
    )
