"""Runnable programs a new user starts from. They use only the public API of edgeloop."""
