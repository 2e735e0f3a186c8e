// Design notes
// - Pixels never cross as values. `OutputView` holds a PyBuffer on the very
//   numpy array the VAE decode was written into: C-contiguous uint8, height x
//   width x channels. Asking for PyBUF.C_CONTIGUOUS makes a strided array
//   fail loudly instead of being misread.
// - The buffer's Format string is never read: on Mono it came back empty or
//   crashed the process. The item size is checked instead (1 byte) and the
//   dtype is the protocol's: uint8.
// - A PyBuffer's memory is valid until Dispose; Dispose takes the GIL itself,
//   so a view can be disposed from any thread.
using System;
using Python.Runtime;

namespace EmbeddedWorker
{
    public abstract class PixelBuffer : IDisposable
    {
        PyObject array;
        PyBuffer buffer;

        public int Height { get; private set; }
        public int Width { get; private set; }
        public int Channels { get; private set; }
        public long Length { get; private set; }
        public IntPtr Pointer { get; private set; }
        public bool ReadOnly { get; private set; }

        protected void Attach(PyObject exporter, PyBUF flags)
        {
            array = exporter;
            buffer = exporter.GetBuffer(flags);
            if (buffer.Dimensions != 3 || buffer.ItemSize != 1 || buffer.Shape == null)
            {
                var dimensions = buffer.Dimensions;
                var itemSize = buffer.ItemSize;
                Release();
                throw new InvalidOperationException(
                    "expected a uint8 height x width x channels buffer, got " + dimensions + " dimensions of "
                    + itemSize + "-byte items");
            }
            Height = checked((int)buffer.Shape[0]);
            Width = checked((int)buffer.Shape[1]);
            Channels = checked((int)buffer.Shape[2]);
            Length = buffer.Length;
            Pointer = buffer.Buffer;
            ReadOnly = buffer.ReadOnly;
        }

        public unsafe byte this[int y, int x, int channel]
        {
            get { return ((byte*)Pointer)[((long)y * Width + x) * Channels + channel]; }
        }

        /// <summary>A managed copy, for callers that must keep pixels past Dispose.</summary>
        public byte[] ToArray()
        {
            var copy = new byte[Length];
            System.Runtime.InteropServices.Marshal.Copy(Pointer, copy, 0, checked((int)Length));
            return copy;
        }

        void Release()
        {
            if (buffer != null) buffer.Dispose();
            if (array != null) array.Dispose();
            buffer = null;
            array = null;
            Pointer = IntPtr.Zero;
        }

        /// <summary>Release the pixels; any thread, any number of times (PythonRuntime does it at shutdown).</summary>
        public void Dispose()
        {
            lock (this)
            {
                if (array == null) return;
                if (PythonEngine.IsInitialized)
                    using (Py.GIL()) Release();
                else array = null;
            }
        }
    }

    /// <summary>An output's pixels, read in place (read-only).</summary>
    public sealed class OutputView : PixelBuffer
    {
        /// <summary>Call with the GIL held; takes ownership of `array`.</summary>
        internal static OutputView Open(PyObject array)
        {
            var view = new OutputView();
            view.Attach(array, PyBUF.C_CONTIGUOUS);
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
            input.Attach(array, PyBUF.C_CONTIGUOUS | PyBUF.WRITABLE);
            return input;
        }

        public unsafe void Set(int y, int x, int channel, byte value)
        {
            ((byte*)Pointer)[((long)y * Width + x) * Channels + channel] = value;
        }
    }
}
