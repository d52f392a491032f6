fn main() {
    // Exports `custom_labels_abi_version` and `custom_labels_current_set` dynamically,
    // where profilers look for them.
    custom_labels::build::emit_build_instructions();
}
