"""The database, and the only importer of SQLAlchemy: the schema, the engine and its Alembic
migrations, and one module per aggregate of the data path, each with its status enums, its
frozen records and a query class over the shared engine. Callers get frozen records, never rows,
connections or sessions; driver errors become :class:`triage_node.errors.DatabaseError` here.

May import the foundation (``errors``, ``domain``) only.
"""
