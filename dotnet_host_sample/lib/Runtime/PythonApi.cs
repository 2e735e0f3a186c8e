// Design notes
// - The hot path (a request in, a reply out) talks to CPython's C API
//   directly: a reply dict is walked once with PyDict_Next over borrowed
//   references and becomes plain C# values; a request becomes a dict built
//   with PyDict_SetItem. No PyObject wrapper is made, so nothing is left for
//   the .NET finalizer and nothing has to be disposed by anyone.
// - The entry points are looked up in the libpython pythonnet loaded
//   (Runtime.PythonDLL), once, after PythonEngine.Initialize. If anything is
//   missing, or the object layout is not the one checked at start (ob_type
//   right after ob_refcnt), `Available` is false and callers take the
//   pythonnet path instead.
// - How each is called differs by runtime (DirectCall): CoreCLR's stubs for
//   delegates made from a function pointer cost more than the C calls they
//   wrap, so there a call is a bare calli; Mono keeps its delegate stubs.
// - Every function here must be called with the GIL held.
using System;
using System.IO;
using System.Reflection.Emit;
using System.Runtime.InteropServices;
using System.Text;

namespace EmbeddedWorker
{
    internal static unsafe class PythonApi
    {
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int GilEnsureFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void GilReleaseFn(int state);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int DictNextFn(IntPtr dict, ref IntPtr position, out IntPtr key, out IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr Utf8Fn(IntPtr text, out IntPtr size);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate long AsLongFn(IntPtr number);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate double AsDoubleFn(IntPtr number);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr SizeFn(IntPtr sequence);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr ItemFn(IntPtr sequence, IntPtr index);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int SetItemFn(IntPtr sequence, IntPtr index, IntPtr stolen);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr NewFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr NewSizedFn(IntPtr size);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int DictSetFn(IntPtr dict, IntPtr key, IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr FromUtf8Fn(byte* text, IntPtr size);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr FromLongFn(long value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr FromDoubleFn(double value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CallFn(IntPtr callable, IntPtr args, IntPtr kwargs);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr UnaryFn(IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void RefFn(IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void FetchFn(out IntPtr type, out IntPtr value, out IntPtr traceback);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void VoidFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate int GetBufferFn(IntPtr exporter, IntPtr view, int flags);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr ImportFn([MarshalAs(UnmanagedType.LPStr)] string name);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr GetAttrFn(IntPtr value, [MarshalAs(UnmanagedType.LPStr)] string name);

        public static bool Available { get; private set; }
        public static string Unavailable { get; private set; }

        public static GilEnsureFn GilEnsure, GilCheck;
        public static GilReleaseFn GilRelease;
        public static NewFn GetThisThreadState, SaveThread;
        public static RefFn ThreadStateClear, ThreadStateDelete;
        public static DictNextFn DictNext;
        public static Utf8Fn AsUtf8;
        public static AsLongFn AsLong;
        public static AsDoubleFn AsDouble, LongAsDouble;
        public static SizeFn ListSize, TupleSize, DictSize;
        public static ItemFn ListItem, TupleItem;
        public static SetItemFn ListSet, TupleSet;
        public static NewFn NewDict, ErrorOccurred;
        public static NewSizedFn NewList, NewTuple;
        public static DictSetFn DictSet;
        public static FromUtf8Fn FromUtf8;
        public static FromLongFn FromLong;
        public static FromDoubleFn FromDouble;
        public static CallFn Call;
        public static UnaryFn Str;
        public static RefFn IncRef, DecRef;
        public static FetchFn Fetch;
        public static VoidFn ClearError;
        public static GetBufferFn GetBuffer;
        public static ImportFn Import;
        public static GetAttrFn GetAttr;
        public static RefFn ReleaseBuffer;

        public static IntPtr None, True, False;
        public static IntPtr UnicodeType, LongType, FloatType, BoolType, DictType, ListType, TupleType;

        /// <summary>Look everything up once; call after PythonEngine.Initialize, with the GIL held.</summary>
        public static void Bind(string libraryPath)
        {
            try
            {
                var library = Native.Open(libraryPath);
                Func<string, IntPtr> symbol = name => Native.Symbol(library, name);
                // buffers first: they need no object layout, so they stay bound when the checks below fail
                GetBuffer = Get<GetBufferFn>(symbol, "PyObject_GetBuffer");
                ReleaseBuffer = Get<RefFn>(symbol, "PyBuffer_Release");
                GilEnsure = Get<GilEnsureFn>(symbol, "PyGILState_Ensure");
                GilRelease = Get<GilReleaseFn>(symbol, "PyGILState_Release");
                GilCheck = Get<GilEnsureFn>(symbol, "PyGILState_Check");
                GetThisThreadState = Get<NewFn>(symbol, "PyGILState_GetThisThreadState");
                SaveThread = Get<NewFn>(symbol, "PyEval_SaveThread");
                ThreadStateClear = Get<RefFn>(symbol, "PyThreadState_Clear");
                ThreadStateDelete = Get<RefFn>(symbol, "PyThreadState_Delete");
                DictNext = Get<DictNextFn>(symbol, "PyDict_Next");
                AsUtf8 = Get<Utf8Fn>(symbol, "PyUnicode_AsUTF8AndSize");
                AsLong = Get<AsLongFn>(symbol, "PyLong_AsLongLong");
                LongAsDouble = Get<AsDoubleFn>(symbol, "PyLong_AsDouble");
                AsDouble = Get<AsDoubleFn>(symbol, "PyFloat_AsDouble");
                ListSize = Get<SizeFn>(symbol, "PyList_Size");
                TupleSize = Get<SizeFn>(symbol, "PyTuple_Size");
                DictSize = Get<SizeFn>(symbol, "PyDict_Size");
                ListItem = Get<ItemFn>(symbol, "PyList_GetItem");
                TupleItem = Get<ItemFn>(symbol, "PyTuple_GetItem");
                ListSet = Get<SetItemFn>(symbol, "PyList_SetItem");
                TupleSet = Get<SetItemFn>(symbol, "PyTuple_SetItem");
                NewDict = Get<NewFn>(symbol, "PyDict_New");
                ErrorOccurred = Get<NewFn>(symbol, "PyErr_Occurred");
                NewList = Get<NewSizedFn>(symbol, "PyList_New");
                NewTuple = Get<NewSizedFn>(symbol, "PyTuple_New");
                DictSet = Get<DictSetFn>(symbol, "PyDict_SetItem");
                FromUtf8 = Get<FromUtf8Fn>(symbol, "PyUnicode_FromStringAndSize");
                FromLong = Get<FromLongFn>(symbol, "PyLong_FromLongLong");
                FromDouble = Get<FromDoubleFn>(symbol, "PyFloat_FromDouble");
                Call = Get<CallFn>(symbol, "PyObject_Call");
                Str = Get<UnaryFn>(symbol, "PyObject_Str");
                IncRef = Get<RefFn>(symbol, "Py_IncRef");
                DecRef = Get<RefFn>(symbol, "Py_DecRef");
                Fetch = Get<FetchFn>(symbol, "PyErr_Fetch");
                Import = Get<ImportFn>(symbol, "PyImport_ImportModule");
                GetAttr = Get<GetAttrFn>(symbol, "PyObject_GetAttrString");
                ClearError = Get<VoidFn>(symbol, "PyErr_Clear");
                None = symbol("_Py_NoneStruct");
                True = symbol("_Py_TrueStruct");
                False = symbol("_Py_FalseStruct");
                UnicodeType = symbol("PyUnicode_Type");
                LongType = symbol("PyLong_Type");
                FloatType = symbol("PyFloat_Type");
                BoolType = symbol("PyBool_Type");
                DictType = symbol("PyDict_Type");
                ListType = symbol("PyList_Type");
                TupleType = symbol("PyTuple_Type");
                // the layout this file assumes: ob_type right after ob_refcnt
                var probe = NewDict();
                bool layout = TypeOf(probe) == DictType && TypeOf(True) == BoolType;
                DecRef(probe);
                if (!layout) throw new InvalidOperationException("unexpected object layout (a free-threaded build?)");
                ThreadStates.NewInterpreter();
                Available = true;
            }
            catch (Exception error)
            {
                Available = false;
                Unavailable = error.Message;
            }
        }

        public static IntPtr TypeOf(IntPtr value)
        {
            return *(IntPtr*)((byte*)value + IntPtr.Size);
        }

        /// <summary>The pending Python error as text, cleared.</summary>
        public static string TakeError()
        {
            string traceback;
            return TakeError(out traceback);
        }

        /// <summary>The pending Python error as text, and its traceback as Python prints it (null without one); cleared.</summary>
        public static string TakeError(out string traceback)
        {
            IntPtr type, value, frames;
            Fetch(out type, out value, out frames);
            string text = "a Python error";
            traceback = null;
            if (value != IntPtr.Zero || type != IntPtr.Zero)
            {
                var shown = Str(value != IntPtr.Zero ? value : type);
                if (shown != IntPtr.Zero)
                {
                    text = ReadString(shown) ?? text;
                    DecRef(shown);
                }
                else ClearError();
                if (frames != IntPtr.Zero) traceback = FormatTraceback(type, value, frames);
            }
            if (type != IntPtr.Zero) DecRef(type);
            if (value != IntPtr.Zero) DecRef(value);
            if (frames != IntPtr.Zero) DecRef(frames);
            return text;
        }

        /// <summary>"".join(traceback.format_exception(type, value, frames)); null (and no error left) when that fails.</summary>
        static string FormatTraceback(IntPtr type, IntPtr value, IntPtr frames)
        {
            IntPtr module = Import("traceback"), format = IntPtr.Zero, lines = IntPtr.Zero, arguments = IntPtr.Zero;
            try
            {
                if (module == IntPtr.Zero || (format = GetAttr(module, "format_exception")) == IntPtr.Zero) return null;
                arguments = NewTuple((IntPtr)3);
                foreach (var item in new[] { type, value != IntPtr.Zero ? value : None, frames })
                    IncRef(item);
                TupleSet(arguments, IntPtr.Zero, type);
                TupleSet(arguments, (IntPtr)1, value != IntPtr.Zero ? value : None);
                TupleSet(arguments, (IntPtr)2, frames);
                lines = Call(format, arguments, IntPtr.Zero);
                if (lines == IntPtr.Zero || TypeOf(lines) != ListType) return null;
                var text = new StringBuilder();
                long count = (long)ListSize(lines);
                for (long i = 0; i < count; i++) text.Append(ReadString(ListItem(lines, (IntPtr)i)));
                return text.ToString();
            }
            finally
            {
                foreach (var made in new[] { module, format, lines, arguments })
                    if (made != IntPtr.Zero) DecRef(made);
                if (ErrorOccurred() != IntPtr.Zero) ClearError();
            }
        }

        public static string ReadString(IntPtr text)
        {
            byte* bytes;
            int length;
            return Utf8Of(text, out bytes, out length) ? Decode(bytes, length) : null;
        }

        /// <summary>A str's UTF-8 bytes, valid while it lives; false (error cleared) for lone surrogates.</summary>
        public static bool Utf8Of(IntPtr text, out byte* bytes, out int length)
        {
            IntPtr size;
            bytes = (byte*)AsUtf8(text, out size);
            length = (int)size;
            if (bytes != null) return true;
            ClearError();  // lone surrogates cannot be UTF-8
            return false;
        }

        /// <summary>UTF-8 bytes as a string; ASCII (nearly every protocol string) widened directly.</summary>
        public static string Decode(byte* bytes, int length)
        {
            if (length > 256) return new string((sbyte*)bytes, 0, length, Encoding.UTF8);
            char* chars = stackalloc char[length];
            for (int i = 0; i < length; i++)
            {
                if (bytes[i] >= 0x80) return new string((sbyte*)bytes, 0, length, Encoding.UTF8);
                chars[i] = (char)bytes[i];
            }
            return new string(chars, 0, length);
        }

        public static IntPtr NewString(string value)
        {
            int most = Encoding.UTF8.GetMaxByteCount(value.Length);
            if (most <= 512)
            {
                byte* stack = stackalloc byte[most];
                fixed (char* chars = value)
                {
                    int length = Encoding.UTF8.GetBytes(chars, value.Length, stack, most);
                    return FromUtf8(stack, (IntPtr)length);
                }
            }
            var heap = Encoding.UTF8.GetBytes(value);
            fixed (byte* bytes = heap) return FromUtf8(bytes, (IntPtr)heap.Length);
        }

        static T Get<T>(Func<string, IntPtr> symbol, string name) where T : class
        {
            var address = symbol(name);
            return (DotNetRuntime.IsMono ? null : DirectCall<T>(address, name))
                   ?? (T)(object)Marshal.GetDelegateForFunctionPointer(address, typeof(T));
        }

        /// <summary>
        /// A delegate whose body is one unmanaged `calli` to `address`: what a C# 9 function pointer compiles to.
        /// CoreCLR's marshalling stub for a GetDelegateForFunctionPointer delegate costs more than the C call it
        /// wraps (it clears and saves the thread's last error, and finds the target through the delegate); calli
        /// costs only the GC transition. Mono runs calli from a dynamic method slower than its own stubs, so it
        /// keeps them. Only signatures C reads as they are in memory; null otherwise. A byref goes to C as a
        /// plain pointer, unpinned: callers pass locals (on the stack, which the GC does not move).
        /// </summary>
        static T DirectCall<T>(IntPtr address, string name) where T : class
        {
            var invoke = typeof(T).GetMethod("Invoke");
            var parameters = invoke.GetParameters();
            var types = new Type[parameters.Length];
            for (int i = 0; i < parameters.Length; i++)
            {
                types[i] = parameters[i].ParameterType;
                if (!Blittable(types[i].IsByRef ? types[i].GetElementType() : types[i])) return null;
            }
            if (invoke.ReturnType != typeof(void) && !Blittable(invoke.ReturnType)) return null;
            try
            {
                var method = new DynamicMethod(name, invoke.ReturnType, types, typeof(PythonApi).Module, true);
                var il = method.GetILGenerator();
                for (int i = 0; i < types.Length; i++) il.Emit(OpCodes.Ldarg, (short)i);
                il.Emit(OpCodes.Ldc_I8, (long)address);
                il.Emit(OpCodes.Conv_I);
                il.EmitCalli(OpCodes.Calli, CallingConvention.Cdecl, invoke.ReturnType, types);
                il.Emit(OpCodes.Ret);
                return (T)(object)method.CreateDelegate(typeof(T));
            }
            catch (Exception)
            {
                return null;  // no code generation here: the marshalling stub works everywhere
            }
        }

        /// <summary>Passed to C as it is in memory (a string or a bool would need marshalling: the stub does it).</summary>
        static bool Blittable(Type type)
        {
            return type == typeof(IntPtr) || type == typeof(int) || type == typeof(long) || type == typeof(double)
                   || type.IsPointer;
        }

        /// <summary>dlopen/dlsym, or LoadLibrary/GetProcAddress: the library pythonnet already loaded.</summary>
        static class Native
        {
            const int RTLD_NOW = 2, RTLD_GLOBAL = 0x100;

            public static IntPtr Open(string path)
            {
                IntPtr handle;
                if (Path.DirectorySeparatorChar == '\\') handle = LoadLibrary(path);
                else
                {
                    try { handle = dlopen2(path, RTLD_NOW | RTLD_GLOBAL); }
                    catch (DllNotFoundException) { handle = dlopen(path, RTLD_NOW | RTLD_GLOBAL); }
                }
                if (handle == IntPtr.Zero) throw new DllNotFoundException("cannot open " + path);
                return handle;
            }

            public static IntPtr Symbol(IntPtr library, string name)
            {
                IntPtr found;
                if (Path.DirectorySeparatorChar == '\\') found = GetProcAddress(library, name);
                else
                {
                    try { found = dlsym2(library, name); }
                    catch (DllNotFoundException) { found = dlsym(library, name); }
                }
                if (found == IntPtr.Zero) throw new MissingMethodException("libpython has no " + name);
                return found;
            }

            [DllImport("libdl.so.2", EntryPoint = "dlopen")] static extern IntPtr dlopen2(string path, int flags);
            [DllImport("libdl.so.2", EntryPoint = "dlsym")] static extern IntPtr dlsym2(IntPtr handle, string name);
            [DllImport("libdl", EntryPoint = "dlopen")] static extern IntPtr dlopen(string path, int flags);
            [DllImport("libdl", EntryPoint = "dlsym")] static extern IntPtr dlsym(IntPtr handle, string name);
            [DllImport("kernel32.dll", CharSet = CharSet.Unicode)] static extern IntPtr LoadLibrary(string path);
            [DllImport("kernel32.dll", CharSet = CharSet.Ansi)] static extern IntPtr GetProcAddress(IntPtr module, string name);
        }
    }
}
