//! Compiles `capnp/affgate.capnp` into `$OUT_DIR/affgate_capnp.rs` with the
//! system `capnp` tool (Debian's 0.9.2 is enough).

fn main() {
    println!("cargo:rerun-if-changed=capnp/affgate.capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("capnp")
        .file("capnp/affgate.capnp")
        .run()
        .expect("compile capnp/affgate.capnp (is the capnp tool installed?)");
}
