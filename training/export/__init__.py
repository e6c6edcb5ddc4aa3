"""Export trained runs as model packages (``model.onnx`` + gradient twin + probe + manifest).

Public entry points: :func:`training.export.exporter.export_run`,
:func:`training.export.package_writer.write_package`,
:func:`training.export.fixtures.export_untrained` and :func:`training.export.verify.verify_package`.
"""
