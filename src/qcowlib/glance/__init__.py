"""OpenStack Glance: streamed, verified uploads (needs openstacksdk)."""
