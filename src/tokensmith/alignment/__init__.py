"""tokensmith.alignment — see docs/ and ../shared/METHODS.md for the planned methods.

This subpackage is filed as its own issue; it will be built on :mod:`tokensmith.models`.
"""
