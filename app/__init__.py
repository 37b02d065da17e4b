"""The playground: a Gradio app serving several adapters and the base in one batched generate().

Installed as `hf_multilora.app` (the `app` extra brings Gradio). Only `ui.py` imports Gradio, so
the rest (`service.Playground`, the streamer, the diff) can be used and tested without it.
"""
