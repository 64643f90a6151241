"""LSUV and orthogonal initialization."""
