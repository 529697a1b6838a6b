"""A fixture app that cannot be imported (its module raises)."""

raise RuntimeError("the database at db.invalid is unreachable")
