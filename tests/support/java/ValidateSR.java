// Validates several SR / Key Object Selection files with one PixelMed DicomSRValidator: its
// constructor compiles the template stylesheets (seconds), so one instance for many files is
// several times faster than a JVM per file. Prints, for each file, a line "==== <path>" and then
// what DicomSRValidator's own main prints for that file (DicomSRValidator.validate(String)).
// Run by tests/support/peers.py with Java's source launcher (JDK 11+).
public class ValidateSR {
    public static void main(String[] args) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator =
                new com.pixelmed.validate.DicomSRValidator();
        for (String path : args) {
            System.out.println("==== " + path);
            try {
                System.out.println(validator.validate(path));
            } catch (Exception e) {
                System.out.println("Error - could not validate: " + e);
            }
        }
    }
}
