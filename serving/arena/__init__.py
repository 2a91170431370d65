"""Chatbot Arena on the serving engine: one prompt, two anonymous contestants answering side by side, a vote,
then the names; votes stored through SQLAlchemy and rated on a leaderboard page (jvila.eval.leaderboard).

`mount_arena(app, ArenaOptions(...))` adds the pages and routes to an app made by create_app
(`jvila serve --arena`).
"""

from serving.arena.routes import ArenaOptions, mount_arena

__all__ = ["ArenaOptions", "mount_arena"]
