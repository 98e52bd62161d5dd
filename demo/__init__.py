"""The nograd demo: ``demo.app`` (the Gradio app and its command line) and ``demo.compare`` (what each tab
computes); the built-in tiny models are ``nograd.tiny``."""
