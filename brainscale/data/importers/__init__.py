"""Importers: turn data in its native layout into brainscale's shards and stores."""
