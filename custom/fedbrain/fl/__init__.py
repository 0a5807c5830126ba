"""NVFlare integration: the site script and job helpers (the only modules that import nvflare)."""
