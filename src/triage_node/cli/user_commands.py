"""``triage-node users add|passwd|remove|list``: the web interface's local users.

Passwords are read from the terminal (asked twice) or, for scripts, from the first line of
standard input; they are hashed with Argon2id and never printed or logged.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys

from triage_node.cli.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from triage_node.config import Config
from triage_node.domain import utcnow

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def add_users_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser("users", help="web interface users (add, passwd, remove, list)")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a user (password from the terminal or stdin)")
    add.add_argument("username")
    add.add_argument(
        "--role",
        choices=["reader", "admin"],
        default="reader",
        help="reader: worklist and study pages; admin: also the dashboard (default reader)",
    )
    passwd = actions.add_parser("passwd", help="set a user's password (ends their sessions)")
    passwd.add_argument("username")
    remove = actions.add_parser("remove", help="remove a user (ends their sessions)")
    remove.add_argument("username")
    actions.add_parser("list", help="users and their roles")


def _read_password() -> str | None:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            print("triage-node users: the passwords differ", file=sys.stderr)
            return None
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run_users(config: Config, args: argparse.Namespace) -> int:
    from triage_node.db.web_access import Role, UserExists
    from triage_node.service.supervisor import prepare_database
    from triage_node.web.passwords import hash_password

    if args.users_command != "list" and not USERNAME.match(args.username):
        print(
            "triage-node users: a user name is 1-64 letters, digits, '.', '_', '@' or '-'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    store = prepare_database(config)  # a fresh install: users come before the first serve
    try:
        access = store.web_access
        if args.users_command == "list":
            for user in access.users():
                print(f"{user.username}\t{user.role.value}\tsince {user.created_at:%Y-%m-%d}")
            return EXIT_OK
        if args.users_command == "remove":
            if not access.remove_user(args.username):
                print(f"triage-node users: no user {args.username!r}", file=sys.stderr)
                return EXIT_FAILED
            access.audit(utcnow(), args.username, "user_removed", peer="cli")
            print(f"removed {args.username}")
            return EXIT_OK
        password = _read_password()
        if not password:
            print("triage-node users: no password given", file=sys.stderr)
            return EXIT_USAGE
        try:
            hashed = hash_password(password)
        except ValueError as exc:
            print(f"triage-node users: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.users_command == "add":
            try:
                access.add_user(args.username, hashed, Role(args.role), utcnow())
            except UserExists as exc:
                print(f"triage-node users: {exc}", file=sys.stderr)
                return EXIT_FAILED
            access.audit(utcnow(), args.username, "user_added", peer="cli", detail=args.role)
            print(f"added {args.username} ({args.role})")
            return EXIT_OK
        if not access.set_password(args.username, hashed, utcnow()):
            print(f"triage-node users: no user {args.username!r}", file=sys.stderr)
            return EXIT_FAILED
        access.audit(utcnow(), args.username, "password_changed", peer="cli")
        print(f"password of {args.username} changed; their sessions ended")
        return EXIT_OK
    finally:
        store.engine.dispose()
