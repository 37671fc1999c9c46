"""Persona's shared base: settings and the errors every tier raises."""
