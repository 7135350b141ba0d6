"""The one error type the API raises for bad requests: a status code and a plain message."""

from __future__ import annotations


class ApiError(Exception):
    """A client error (4xx) with a message meant for the person at the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)
