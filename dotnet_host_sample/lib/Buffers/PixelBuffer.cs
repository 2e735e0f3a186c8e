// Design notes
// - Pixels never cross as values. `OutputView` holds the buffer of the very
//   numpy array the VAE decode was written into: C-contiguous uint8, height x
//   width x channels. The buffer is taken through the C API (BufferLease), so
//   its format is read on both runtimes and checked: "B", one byte per item.
//   A strided array fails loudly instead of being misread.
// - The memory is valid until Dispose, and only then: every read here (the
//   indexer, CopyRow, ToArray, Set) checks the lease, so a read after release
//   is an ObjectDisposedException, never a crash or another object's bytes.
//   `Pointer` is the raw address for code that reads in bulk; it is zero
//   after Dispose, and reads through it are the caller's to keep before it.
// - Dispose takes the GIL itself, so a view can be disposed from any thread.
#pragma warning disable 612  // PyObject.Handle: read while the object is alive, to take its buffer
using System;
using System.Runtime.InteropServices;
using Python.Runtime;

namespace EmbeddedWorker
{
    public abstract class PixelBuffer : IDisposable
    {
        BufferLease lease;

        public int Height { get; private set; }
        public int Width { get; private set; }
        public int Channels { get; private set; }
        public long Length { get; private set; }
        /// <summary>The struct-module format of an item, as the exporter gave it ("B").</summary>
        public string Format { get; private set; }
        public bool ReadOnly { get; private set; }
        public bool IsDisposed { get { return lease == null || lease.Released; } }

        /// <summary>The first byte; valid until Dispose (then zero). Prefer the checked reads.</summary>
        public IntPtr Pointer { get { return lease != null ? lease.Pointer : IntPtr.Zero; } }

        /// <summary>With the GIL held; `exporter` stays the caller's (the buffer holds its own reference).</summary>
        protected void Attach(PyObject exporter, bool writable)
        {
            var taken = BufferLease.Take(exporter.Handle, writable, GetType().Name);
            if (taken.Shape.Length != 3 || taken.ItemSize != 1 || (taken.Format != "B" && taken.Format != "<B" && taken.Format != "=B"))
            {
                var what = taken.Shape.Length + " dimensions of '" + taken.Format + "' (" + taken.ItemSize + "-byte items)";
                taken.Release();
                throw new InvalidOperationException("expected a uint8 height x width x channels buffer, got " + what);
            }
            Height = checked((int)taken.Shape[0]);
            Width = checked((int)taken.Shape[1]);
            Channels = checked((int)taken.Shape[2]);
            Length = taken.Length;
            Format = taken.Format;
            ReadOnly = taken.ReadOnly;
            lease = taken;
        }

        public unsafe byte this[int y, int x, int channel]
        {
            get
            {
                long at = Offset(y, x, channel);
                Enter();
                try { return ((byte*)lease.Pointer)[at]; }
                finally { lease.Leave(); }
            }
        }

        /// <summary>Row `y` (Width x Channels bytes) into `destination` at `offset`.</summary>
        public void CopyRow(int y, byte[] destination, int offset)
        {
            if (y < 0 || y >= Height) throw new ArgumentOutOfRangeException("y");
            int rowBytes = Width * Channels;
            Enter();
            try { Marshal.Copy(lease.Pointer + (int)((long)y * rowBytes), destination, offset, rowBytes); }
            finally { lease.Leave(); }
        }

        /// <summary>A managed copy, for callers that must keep pixels past Dispose.</summary>
        public byte[] ToArray()
        {
            var copy = new byte[Length];
            Enter();
            try { Marshal.Copy(lease.Pointer, copy, 0, checked((int)Length)); }
            finally { lease.Leave(); }
            return copy;
        }

        protected unsafe void Write(int y, int x, int channel, byte value)
        {
            if (ReadOnly) throw new InvalidOperationException("this buffer is read-only");
            long at = Offset(y, x, channel);
            Enter();
            try { ((byte*)lease.Pointer)[at] = value; }
            finally { lease.Leave(); }
        }

        long Offset(int y, int x, int channel)
        {
            if ((uint)y >= (uint)Height || (uint)x >= (uint)Width || (uint)channel >= (uint)Channels)
                throw new IndexOutOfRangeException("(" + y + ", " + x + ", " + channel + ") is outside " + Height + "x" + Width + "x" + Channels);
            return ((long)y * Width + x) * Channels + channel;
        }

        void Enter()
        {
            var current = lease;
            if (current == null) throw new ObjectDisposedException(GetType().Name);
            current.Enter();
        }

        /// <summary>Release the pixels; any thread, any number of times (PythonRuntime does it at shutdown).</summary>
        public void Dispose()
        {
            var current = lease;
            if (current != null) current.Release();
        }
    }

    /// <summary>An output's pixels, read in place (read-only).</summary>
    public sealed class OutputView : PixelBuffer
    {
        /// <summary>Call with the GIL held; `array` stays the caller's.</summary>
        internal static OutputView Open(PyObject array)
        {
            var view = new OutputView();
            view.Attach(array, false);
            return view;
        }
    }

    /// <summary>An input the host writes in place, then names by InputId.</summary>
    public sealed class InputBuffer : PixelBuffer
    {
        public string InputId { get; private set; }

        internal static InputBuffer Open(string inputId, PyObject array)
        {
            var input = new InputBuffer { InputId = inputId };
            input.Attach(array, true);
            return input;
        }

        public void Set(int y, int x, int channel, byte value)
        {
            Write(y, x, channel, value);
        }
    }
}
