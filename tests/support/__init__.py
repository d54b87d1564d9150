"""The one home of the helpers the test modules and conftest files share (each defined once here;
no test module or conftest is imported by another module):

- paths: ROOT, SAMPLE_TAR, BIN (the virtualenv's bin/)
- cli: run_cli, assert_user_error, RayStarted
- files: tree_snapshot, no_debris (TEMP_MARKERS), params, copy_sample_voc, mounted
- procs: free_port, wait_http, stop_tree (by PID, never by name), tool_env, ActorTitles
- training: TINY, tiny_overrides, TRAINED_FAMILIES / TRAINED_SEEDS / TRAINED_EPOCHS
- servers: FileServer, DenyHandler (local HTTP servers)
- models: NAMES, ODD, cases, first_conv, train_miou, TORCHVISION (seg_models tests)
- cluster: network_namespace, NS_HOST, NS_PEER, PASSWORD, ray_ports, basic, submit_job, wait_job
- readme: the README's shell blocks and commands (BLOCKS, split_commands, ...), and what the
  cluster test substitutes in them (substitutions, tiny_sets, runnable_script)

Fixtures and pytest hooks stay in the conftest.py files.
"""
