"""The web app: Gradio layout (ui), per-session handlers (handlers), API endpoints (api), loaded models (services)."""
