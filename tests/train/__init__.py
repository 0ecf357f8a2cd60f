"""Tests of sftjax.train."""
