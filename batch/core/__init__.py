"""The torch-free base every package uses (numpy and Pillow only).

Images, masks, the ONNX contract, files, devices, logs, timing and the project's error base class.
"""
