"""sftjax."""
