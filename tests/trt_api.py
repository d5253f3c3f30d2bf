"""Test data: every TensorRT Python entry point edet-deploy calls, for the test that checks them against the bindings
of TensorRT 10.13 and 11.4 (names present in `tensorrt_bindings/tensorrt.so` of each bindings wheel) and the
`tensorrt.plugin` package each ships."""

# trt.<name> and methods of the objects TensorRT returns
TRT_API = (
    "__version__", "Builder", "NetworkDefinitionCreationFlag", "PREFER_AOT_PYTHON_PLUGINS", "STRONGLY_TYPED",
    "OnnxParser",
    "parse_from_file", "ProfilingVerbosity", "DETAILED", "profiling_verbosity", "create_engine_inspector",
    "get_engine_information", "LayerInformationFormat", "JSON", "ILogger", "WARNING", "BuilderFlag", "TF32",
    "clear_flag",
    "get_error", "num_errors", "create_network", "create_builder_config", "set_memory_pool_limit",
    "MemoryPoolType", "WORKSPACE", "create_timing_cache", "set_timing_cache", "get_timing_cache",
    "create_optimization_profile", "set_shape", "add_optimization_profile", "build_serialized_network",
    "get_input", "get_output", "num_inputs", "num_outputs", "ILogger", "Severity", "INTERNAL_ERROR",
    "Logger", "Runtime", "deserialize_cuda_engine", "create_execution_context", "get_tensor_name",
    "num_io_tensors", "get_tensor_mode", "TensorIOMode", "OUTPUT", "set_input_shape", "get_tensor_shape",
    "get_tensor_dtype", "set_tensor_address", "execute_async_v3", "float32", "float16", "int32", "uint8", "int64",
    "serialize", "IProgressMonitor", "progress_monitor", "phase_start", "step_complete", "phase_finish",
)
# tensorrt.plugin names (pure Python in the bindings wheel)
TRT_PLUGIN_API = ("register", "aot_impl", "impl", "TensorDesc", "Tensor", "from_shape_expr", "KernelLaunchParams",
                  "SymIntExprs", "SymInt32")
