# JupyterLab settings for this project's notebooks (`make lab` and `make test-browser` pass this file).
# Saving (autosave too) keeps the tracked notebooks output-free: the outputs are kept in
# executed/lab/NAME.ipynb beside them (ignored by git); see emerdiff/notebook/lab.py.
c = get_config()  # noqa: F821  (provided by Jupyter when it loads this file)
c.ContentsManager.pre_save_hook = "emerdiff.notebook.lab.pre_save"
