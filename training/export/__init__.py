"""Export trained runs as model packages (``model.onnx`` + gradient twin + probe + manifest).

Public entry points: :func:`dcs.training.export.exporter.export_run`,
:func:`dcs.training.export.package_writer.write_package`,
:func:`dcs.training.export.fixtures.export_untrained` and :func:`dcs.training.export.verify.verify_package`.
"""
