"""selfspec: Self-Specialization of LLMs (Kang et al., 2023), scaled with Ray.

Importing this package stays light: torch, ray and model engines load only
inside the stage that needs them.
"""

__version__ = "0.1.0"
