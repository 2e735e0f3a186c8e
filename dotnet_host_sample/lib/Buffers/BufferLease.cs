// Design notes
// - A buffer is taken and released through CPython's C API (PyObject_GetBuffer,
//   PyBuffer_Release) into a Py_buffer this library allocates and reads
//   itself, never through pythonnet's PyBuffer. On CoreCLR, pythonnet 3.2.1's
//   GetBuffer(PyBUF.C_CONTIGUOUS | PyBUF.FORMATS) aborted the process at its
//   first call ("double free or corruption"); Mono ran it. Here `format` is a
//   pointer that is read and never freed, so the format is asked for and
//   checked on both runtimes.
// - The Py_buffer lives in unmanaged memory from take to release (an exporter
//   may keep its address); it holds its own reference to the exporter.
// - Reads enter and leave the lease (a count). Release marks it released,
//   waits for the reads in flight, then gives the buffer back: a read after
//   release is an ObjectDisposedException, never a read of freed memory.
using System;
using System.Runtime.InteropServices;
using System.Threading;

namespace EmbeddedWorker
{
    internal sealed unsafe class BufferLease
    {
        [StructLayout(LayoutKind.Sequential)]
        struct PyBufferView
        {
            public IntPtr Buf, Obj, Len, ItemSize;
            public int ReadOnly, Dimensions;
            public IntPtr Format, Shape, Strides, SubOffsets, Internal;
        }

        // CPython's PyBUF_* flags
        public const int Writable = 0x1, WithFormat = 0x4, CContiguous = 0x38;

        readonly string owner;
        IntPtr view;  // PyBufferView*, until released
        int readers;
        int released;  // 1 once Release began; set with a full fence, so a reader either sees it or is waited for

        public IntPtr Pointer { get; private set; }
        public long Length { get; private set; }
        public int ItemSize { get; private set; }
        public bool ReadOnly { get; private set; }
        /// <summary>The struct-module format ("B" for uint8, "q" or "l" for int64).</summary>
        public string Format { get; private set; }
        public long[] Shape { get; private set; }

        BufferLease(string owner)
        {
            this.owner = owner;
        }

        /// <summary>The exporter's buffer (C-contiguous, with its format); with the GIL held. Throws when it has none.</summary>
        public static BufferLease Take(IntPtr exporter, bool writable, string owner)
        {
            if (PythonApi.GetBuffer == null)
                throw new InvalidOperationException("the C API is not bound: " + PythonApi.Unavailable);
            var memory = Marshal.AllocHGlobal(sizeof(PyBufferView));
            *(PyBufferView*)memory = default(PyBufferView);
            if (PythonApi.GetBuffer(exporter, memory, CContiguous | WithFormat | (writable ? Writable : 0)) != 0)
            {
                Marshal.FreeHGlobal(memory);
                throw new InvalidOperationException("no C-contiguous buffer: " + PythonApi.TakeError());
            }
            var taken = (PyBufferView*)memory;
            var lease = new BufferLease(owner)
            {
                view = memory,
                Pointer = taken->Buf,
                Length = (long)taken->Len,
                ItemSize = (int)(long)taken->ItemSize,
                ReadOnly = taken->ReadOnly != 0,
                Format = taken->Format == IntPtr.Zero ? "B" : Marshal.PtrToStringAnsi(taken->Format),
                Shape = new long[taken->Dimensions],
            };
            for (int i = 0; i < taken->Dimensions; i++) lease.Shape[i] = ((IntPtr*)taken->Shape)[i].ToInt64();
            return lease;
        }

        /// <summary>Begin a read of the memory; ObjectDisposedException once released. Pair with Leave.</summary>
        public void Enter()
        {
            if (!TryEnter()) throw new ObjectDisposedException(owner, "the buffer was released: its memory is gone");
        }

        /// <summary>Begin a read of the memory; false once released. Pair a true with Leave.</summary>
        public bool TryEnter()
        {
            Interlocked.Increment(ref readers);
            if (Volatile.Read(ref released) == 0) return true;
            Interlocked.Decrement(ref readers);
            return false;
        }

        public void Leave()
        {
            Interlocked.Decrement(ref readers);
        }

        public bool Released { get { return Volatile.Read(ref released) != 0; } }

        /// <summary>Give the buffer back once the reads in flight end; any thread, any number of times.</summary>
        public void Release()
        {
            if (Interlocked.Exchange(ref released, 1) != 0) return;
            var spin = new SpinWait();
            while (Volatile.Read(ref readers) != 0) spin.SpinOnce();
            Pointer = IntPtr.Zero;
            if (!Python.Runtime.PythonEngine.IsInitialized) return;  // the interpreter, and the memory, are gone
            using (Gil.Hold()) PythonApi.ReleaseBuffer(view);
            Marshal.FreeHGlobal(view);
            view = IntPtr.Zero;
        }
    }
}
