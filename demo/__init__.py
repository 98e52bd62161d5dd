"""The nograd demo: ``demo.app`` (the Gradio app and its command line), ``demo.compare`` (what each tab computes),
``demo.tiny`` (the built-in tiny models)."""
