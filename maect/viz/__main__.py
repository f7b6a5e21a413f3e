"""python -m maect.viz: see maect.viz's docstring."""
from maect.viz import main

main()
