"""The web interface: the radiologist's worklist and study pages, the admin's dashboard.

Starlette (ASGI) served by uvicorn in the supervisor process, Jinja2 templates with
auto-escaping, Argon2id passwords, sessions kept in the database.
"""
