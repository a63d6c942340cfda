fn main() -> std::process::ExitCode {
    outboard_backends::virtio_blk::main(std::env::args_os())
}
