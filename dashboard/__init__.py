"""Streamlit dashboard over fedbrain job outputs."""

MAX_UPLOAD_MB = 20  # uploads above this are refused (server.maxUploadSize and the Predict page)
