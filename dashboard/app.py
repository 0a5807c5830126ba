"""Streamlit entry point: a router over the page functions of :mod:`fedbrain.dashboard.views`.

Run it with ``fedbrain dashboard [--workspace DIR] [--port N]`` (which sets ``FEDBRAIN_WORKSPACE`` and
starts Streamlit headless on 127.0.0.1 without telemetry).
"""

from __future__ import annotations

import streamlit as st

from fedbrain.dashboard import views

PAGES = (
    (views.federation_page, "Federation", "federation", ":material/hub:"),
    (views.compression_page, "Compression", "compression", ":material/compress:"),
    (views.evaluation_page, "Evaluation", "evaluation", ":material/fact_check:"),
    (views.privacy_page, "Privacy", "privacy", ":material/shield_lock:"),
    (views.predict_page, "Predict", "predict", ":material/radiology:"),
    (views.models_page, "Models", "models", ":material/leaderboard:"),
)


def main() -> None:
    st.set_page_config(page_title="fedbrain dashboard", page_icon=":material/neurology:", layout="wide")
    pages = [st.Page(fn, title=title, url_path=url, icon=icon, default=(i == 0))
             for i, (fn, title, url, icon) in enumerate(PAGES)]
    st.navigation(pages).run()


main()
