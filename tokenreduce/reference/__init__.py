"""Reference VLMs trained by the project on easy-VQA and shipped inside the package (work in progress: see issue 7)."""
