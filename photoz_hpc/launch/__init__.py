"""The top of the data flow: commands that chain the layers below (fine-tune then evaluate, quickstart)."""
