"""Errors of the ensemble plugin, each with the HTTP status it becomes at the handler boundary.

EnsembleError
 +-- ConfigError          ensembles.yaml or an archive manifest is invalid (build / registration time)
 +-- IntegrityError       a member file's sha256 differs from the manifest (registration time)
 +-- MemberLoadError      a member cannot be built or its state_dict does not fit (registration time)
 +-- QuorumNotMet         too few members, or not a required one, answered one request -> 503
 +-- RequestError         one request is wrong; only that request fails           -> 400
      +-- InvalidImage          bytes that are not a decodable image of an accepted format -> 400
      +-- UnsupportedMediaType  a content type we cannot read images from              -> 415
      +-- PayloadTooLarge       more images than allowed, or an image over the pixel limit -> 413
      +-- InvalidPolicy         unknown policy name or an ill-formed parameter             -> 400
"""

from __future__ import annotations


class EnsembleError(Exception):
    """Base class; `status` is the HTTP code a request gets when this error is about it."""

    status = 500

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_json(self) -> dict[str, object]:
        """The error body every failed request receives: code, type and a message that says what is wrong."""
        return {"code": self.status, "type": self.kind, "message": str(self)}


class ConfigError(EnsembleError):
    """ensembles.yaml or an archive manifest is invalid; the message names the file and the key path."""


class IntegrityError(EnsembleError):
    """A member file's sha256 differs from the one pinned in the manifest; nothing is loaded from it."""


class MemberLoadError(EnsembleError):
    """A member's architecture cannot be built, or its state_dict does not load with strict=True."""


class QuorumNotMet(EnsembleError):
    """Too few of a request's members answered it, or a required one did not (503): by its deadline, or because they
    raised, gave non-finite scores or were busy. Only that request fails; the body names each missing member and why."""

    status = 503

    def __init__(self, message: str, missing: dict[str, str], images: list[int]) -> None:
        super().__init__(message)
        self.missing = missing
        self.images = images

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "missing": self.missing, "images": self.images}


class RequestError(EnsembleError):
    """One request is malformed (400). Other requests of the same batch are unaffected."""

    status = 400


class InvalidImage(RequestError):
    """An image that cannot be decoded: not an image, truncated, or of a format we do not accept (400)."""


class UnsupportedMediaType(RequestError):
    """A request body whose content type carries no images we can read (415)."""

    status = 415


class PayloadTooLarge(RequestError):
    """More images than the ensemble allows per request, or an image over its pixel limit (413)."""

    status = 413


class InvalidPolicy(RequestError):
    """An unknown policy name, or a parameter the policy does not take or that is out of range (400)."""


# The `type` a refused request can carry: the request errors, a quorum not met, and EnsembleError for a bug caught
# per request.
ERROR_TYPES = tuple(
    error.__name__
    for error in (
        RequestError,
        InvalidImage,
        UnsupportedMediaType,
        PayloadTooLarge,
        InvalidPolicy,
        QuorumNotMet,
        EnsembleError,
    )
)
